"""Incremental shard: a grown (or shrunk) collection reuses unchanged shards and ends with the
same samples, byte for byte per sample, as a from-scratch run (shard boundaries may differ)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmpipe.align import run_align
from mmpipe.config import AlignParams, ShardParams
from mmpipe.incremental import MEMBERS
from mmpipe.io import read_json
from mmpipe.shard import run_shard

SPLIT = AlignParams(train=0.6, val=0.2, test=0.2)
PARAMS = ShardParams(image_size=16, workers=1, copies=1, maxcount=6)


def samples(shard_dir: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every tar of the manifest (each key exactly once)."""
    out: dict[str, dict[str, bytes]] = {}
    n = 0
    for entry in read_json(shard_dir / "manifest.json")["splits"].values():
        for shard in entry["shards"]:
            with tarfile.open(shard_dir / shard["name"]) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.rsplit(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
            n += shard["count"]
    assert n == len(out), "a sample is in two shards"
    return out


@pytest.fixture
def night(make_ingest, tmp_path):
    """night(n_images, previous) -> (shard dir, report): ingest + align + shard of images 0..n-1."""

    def run(name: str, n_images: int, previous: Path | None = None) -> tuple[Path, dict]:
        ingest = make_ingest(n_images=n_images, name=f"ingest-{name}")
        run_align(ingest, SPLIT, tmp_path / f"align-{name}")
        out = tmp_path / f"shards-{name}"
        return out, run_shard(tmp_path / f"align-{name}", ingest, PARAMS, out, previous)

    return run


def test_a_grown_collection_reuses_shards_and_equals_from_scratch(night):
    first, r1 = night("1", 40)
    assert r1["reused_shards"] == 0 and r1["new_samples"] == r1["samples"]
    grown, r2 = night("2", 44, previous=first)  # 10 % more images
    scratch, r3 = night("3", 44)
    assert r2["reused_shards"] > 0 and 0 < r2["new_samples"] < r3["samples"] // 2
    assert samples(grown) == samples(scratch)
    assert r2["samples"] == r3["samples"]
    old = read_json(first / "manifest.json")["splits"]
    for split, entry in read_json(grown / "manifest.json")["splits"].items():
        before = {s["name"]: s["sha256"] for s in old[split]["shards"]}
        for shard in entry["shards"]:
            if shard["name"] in before:  # a kept name is the very same file
                assert before[shard["name"]] == shard["sha256"]
    members = pq.read_table(grown / MEMBERS).to_pylist()  # a row per caption of a sample
    assert sorted({m["key"] for m in members}) == sorted(samples(scratch))
    manifest = read_json(grown / "manifest.json")["splits"]
    assert len(members) == sum(e["pairs"] for e in manifest.values())


def test_a_caption_added_to_one_image_reencodes_only_its_shard(make_ingest, tmp_path):
    """The reuse unit is the image sample: a shard holding an image that gained a caption is
    encoded again (with the image's other samples), every other shard is kept as it is."""
    import pandas as pd

    ingest = make_ingest(n_images=40, name="ingest")
    run_align(ingest, SPLIT, tmp_path / "align-1")
    first = tmp_path / "shards-1"
    run_shard(tmp_path / "align-1", ingest, PARAMS, first)
    records = pd.read_parquet(ingest / "records.parquet")
    pairs = pd.read_parquet(tmp_path / "align-1" / "pairs.parquet")
    image = pairs[pairs["split"] == "val"].iloc[0]  # val: one sample per image, no copies
    row = records[records["caption_id"] == image["caption_id"]].iloc[0].to_dict()
    row.update(caption="one more caption", line=10_000, caption_id="0" * 16)
    pd.concat([records, pd.DataFrame([row])]).to_parquet(ingest / "records.parquet", index=False)
    run_align(ingest, SPLIT, tmp_path / "align-2")
    grown = tmp_path / "shards-2"
    report = run_shard(tmp_path / "align-2", ingest, PARAMS, grown, previous=first)
    scratch = tmp_path / "shards-3"
    run_shard(tmp_path / "align-2", ingest, PARAMS, scratch)
    assert samples(grown) == samples(scratch)
    old = read_json(first / "manifest.json")["splits"]
    new = read_json(grown / "manifest.json")["splits"]
    holder = next(  # the val shard that held the image
        m["shard"] for m in pq.read_table(first / MEMBERS).to_pylist()
        if m["pair_id"] == image["pair_id"]
    )  # fmt: skip
    kept = {s["name"] for e in new.values() for s in e["shards"]}
    was = {s["name"]: s["count"] for e in old.values() for s in e["shards"]}
    assert holder not in kept and set(was) - {holder} <= kept
    assert report["reused_shards"] == len(was) - 1 and report["new_samples"] == was[holder]
    assert (
        new["val"]["pairs"] == old["val"]["pairs"] + 1
        and new["val"]["count"] == old["val"]["count"]
    )
    got = samples(grown)[image["image_id"]]
    assert b"one more caption" in got["txt"]


def test_deleted_records_retire_their_shards_samples(night):
    first, _ = night("1", 40)
    shrunk, r2 = night("2", 36, previous=first)  # the last 4 images and their captions are gone
    scratch, r3 = night("3", 36)
    assert samples(shrunk) == samples(scratch) and r2["samples"] == r3["samples"]
    assert r2["reused_shards"] > 0


def test_other_params_reuse_nothing(night, tmp_path):
    first, _ = night("1", 20)
    align, ingest = tmp_path / "align-1", tmp_path / "ingest-1"
    p = PARAMS.model_copy(update={"jpeg_quality": 80})
    report = run_shard(align, ingest, p, tmp_path / "other", previous=first)
    assert report["reused_shards"] == 0 and report["new_samples"] == report["samples"]
    same = run_shard(align, ingest, PARAMS, tmp_path / "same", previous=first)
    assert same["new_samples"] == 0 and same["reused_shards"] == same["shards"]
    # every file the same bytes (members.parquet too): a forced re-run keeps dvc.lock's hash
    for path in first.iterdir():
        assert (tmp_path / "same" / path.name).read_bytes() == path.read_bytes(), path.name


def test_shards_written_by_another_sample_code_are_not_reused(night, tmp_path, monkeypatch):
    """Same params, another decoder (an mmpipe or Pillow upgrade): reuse would mix old and new
    samples, so nothing is reused and the result equals a from-scratch run."""
    import mmpipe.shard

    first, _ = night("1", 20)
    align, ingest = tmp_path / "align-1", tmp_path / "ingest-1"
    monkeypatch.setattr(mmpipe.shard, "SAMPLE_CODE", mmpipe.shard.SAMPLE_CODE + 1)
    report = run_shard(align, ingest, PARAMS, tmp_path / "upgraded", previous=first)
    assert report["reused_shards"] == 0 and report["new_samples"] == report["samples"]
