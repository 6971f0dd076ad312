"""Shards of one sample per image with all its captions (issue 28 item 3): what shard writes,
the loader's captions="one" (a seeded caption per image and epoch) and "all" (every caption,
the image decoded once), shards written with one sample per pair, the feature cache's keys."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

import mmpipe.data
import mmpipe.shard
from mmpipe.align import run_align
from mmpipe.config import AlignParams, ShardParams
from mmpipe.data import (
    TarSamples,
    caption_choice,
    create_dataloader,
    iterate_split,
    row_key,
    split_shards,
)
from mmpipe.errors import InputError
from mmpipe.featurecache import _inputs
from mmpipe.manifest import read_manifest
from mmpipe.shard import run_shard
from tests.conftest import write_mood_shards

SPLIT = AlignParams(train=0.5, val=0.25, test=0.25)
PARAMS = {"image_size": 16, "workers": 1, "copies": 1, "maxcount": 4}


@pytest.fixture
def sharded(make_ingest, tmp_path) -> tuple[Path, pd.DataFrame]:
    """(shard dir, pairs.parquet) of 30 images with 1 to 3 captions each."""
    ingest = make_ingest(n_images=30)
    run_align(ingest, SPLIT, tmp_path / "align")
    run_shard(tmp_path / "align", ingest, ShardParams(**PARAMS), tmp_path / "shards")
    return tmp_path / "shards", pd.read_parquet(tmp_path / "align" / "pairs.parquet")


def raw_samples(shard_dir: Path, split: str) -> list[dict]:
    return [s for ref in split_shards(shard_dir, split) for s in TarSamples()(iter([ref.__dict__]))]


def test_one_sample_per_image_with_all_its_captions(sharded):
    shard_dir, pairs = sharded
    manifest = read_manifest(shard_dir)
    multi = 0
    for split in ("train", "val", "test"):
        want = pairs[pairs["split"] == split]
        copies = 2 if split == "train" else 1
        samples = raw_samples(shard_dir, split)
        assert len(samples) == manifest.count(split) == want["image_id"].nunique() * copies
        assert manifest.pairs(split) == len(want) * copies
        assert sum(e.pairs for e in manifest.splits[split].shards) == manifest.pairs(split)
        keys = [s["__key__"] for s in samples]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for s in samples:
            meta = json.loads(s["json"])
            image_id = meta["image_id"]
            assert s["__key__"] == image_id + (f"_aug{meta['copy']}" if meta["copy"] else "")
            mine = want[want["image_id"] == image_id].sort_values("pair_id")
            assert [p["pair_id"] for p in meta["pairs"]] == mine["pair_id"].tolist()
            assert [p["caption"] for p in meta["pairs"]] == mine["caption"].tolist()
            assert [p["label_index"] for p in meta["pairs"]] == mine["label_index"].tolist()
            assert s["txt"].decode() == "\n".join(mine["caption"])
            assert Image.open(io.BytesIO(s["jpg"])).size == (16, 16)
            multi += len(meta["pairs"]) > 1
    assert multi > 0  # the fixture has images with several captions


def test_a_job_never_splits_an_image(sharded, make_ingest, tmp_path, monkeypatch):
    """Jobs of ~2 pairs cut between whole images on two workers: the same bytes."""
    shard_dir, _ = sharded
    monkeypatch.setattr(mmpipe.shard, "JOB_PAIRS", 2)
    params = ShardParams(**{**PARAMS, "workers": 2})
    run_shard(tmp_path / "align", shard_dir.parent / "ingest", params, tmp_path / "small")
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "small").iterdir())
    for name in names:
        assert (shard_dir / name).read_bytes() == (tmp_path / "small" / name).read_bytes(), name


def _picks(shard_dir: Path, epoch: int, **kw) -> dict[str, str]:
    """sample_key -> the row key ("one" reads one row per image sample) of one epoch."""
    kw = {"shuffle_buffer": 8, "seed": 3, "captions": "one", **kw}
    out: dict[str, str] = {}
    for batch in create_dataloader(shard_dir, "train", 4, epoch=epoch, **kw):
        assert len(set(batch["sample_key"])) == len(batch["sample_key"])
        for sample_key, key in zip(batch["sample_key"], batch["key"], strict=True):
            assert sample_key not in out
            out[sample_key] = key
    return out


def test_captions_one_is_seeded_by_seed_epoch_and_sample(sharded):
    shard_dir, pairs = sharded
    manifest = read_manifest(shard_dir)
    first = _picks(shard_dir, 0)
    assert len(first) == manifest.count("train")  # one row per image sample
    by_image = {
        i: g.sort_values("pair_id")["pair_id"].tolist() for i, g in pairs.groupby("image_id")
    }
    for sample_key, key in first.items():
        image_id, _, copy = sample_key.partition("_aug")
        ids = by_image[image_id]
        i = caption_choice(3, 0, sample_key, len(ids))
        assert key == row_key(sample_key, ids[i], int(copy or 0))
    assert _picks(shard_dir, 0, num_workers=2) == first  # any worker layout
    assert _picks(shard_dir, 0, shuffle_buffer=0) == first  # any sample order
    assert _picks(shard_dir, 1) != first  # another epoch, other captions
    ranks = [_picks(shard_dir, 0, rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert len(ranks[0]) == len(ranks[1]) == manifest.count("train") // 2
    for picks in ranks:  # the same choice on every rank
        assert all(first[k] == v for k, v in picks.items())


def test_captions_one_resumes_exactly(sharded):
    shard_dir, _ = sharded
    kw = {"shuffle_buffer": 8, "seed": 5, "epoch": 2, "captions": "one"}
    full = list(create_dataloader(shard_dir, "train", 4, **kw))
    resumed = list(create_dataloader(shard_dir, "train", 4, skip_batches=2, **kw))
    assert [b["key"] for b in resumed] == [b["key"] for b in full[2:]]
    assert [b["text"] for b in resumed] == [b["text"] for b in full[2:]]
    assert torch.equal(resumed[0]["image"], full[2]["image"])


def test_captions_all_gives_every_pair_with_its_image_decoded_once(sharded, monkeypatch):
    shard_dir, pairs = sharded
    calls = []
    decode = mmpipe.data.decode_rgb
    monkeypatch.setattr(mmpipe.data, "decode_rgb", lambda b: calls.append(1) or decode(b))
    loader = create_dataloader(shard_dir, "val", 5)
    batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    val = pairs[pairs["split"] == "val"].set_index("pair_id")
    assert sorted(keys) == sorted(val.index)
    assert loader.stats["expected"] == loader.stats["samples"] == len(val)
    assert len(calls) == read_manifest(shard_dir).count("val") < len(val)
    texts = [t for b in batches for t in b["text"]]
    assert texts == val.loc[keys, "caption"].tolist()
    images = torch.cat([b["image"] for b in batches])
    ids = [i for b in batches for i in b["image_id"]]
    for i, image_id in enumerate(ids):  # the rows of one image carry the same pixels
        j = ids.index(image_id)
        assert torch.equal(images[i], images[j]) and val.loc[keys[i], "image_id"] == image_id


def test_captions_all_over_ranks_needs_one_rank(sharded):
    with pytest.raises(InputError, match="world_size 1"):
        create_dataloader(sharded[0], "train", 4, captions="all", world_size=2)
    with pytest.raises(InputError, match="captions must be one of"):
        list(create_dataloader(sharded[0], "train", 4, captions="some"))


def test_iterate_split_yields_a_record_per_caption(sharded):
    shard_dir, pairs = sharded
    rows = list(iterate_split(shard_dir, "val"))
    val = pairs[pairs["split"] == "val"].set_index("pair_id")
    assert sorted(r["__key__"] for r in rows) == sorted(val.index)
    for r in rows:
        assert r["txt"] == val.loc[r["json"]["pair_id"], "caption"] == r["json"]["caption"]
        assert r["sample_key"] == r["json"]["image_id"] == val.loc[r["__key__"], "image_id"]


def test_per_pair_shards_still_load(tmp_path):
    """Shards written with one sample per pair: every caption row is its sample ("one" and
    "all" alike), keyed as before; the same rows as the image layout's "all"."""
    old = write_mood_shards(tmp_path / "pair", layout="pair")
    new = write_mood_shards(tmp_path / "image", layout="image")
    assert read_manifest(new).count("train") * 2 == read_manifest(old).count("train")

    def rows(shards: Path, captions: str) -> list[tuple]:
        out = []
        for b in create_dataloader(shards, "train", 8, captions=captions):
            out += zip(b["key"], b["text"], b["label"].tolist(), b["sample_key"], strict=True)
        return sorted(out)

    for captions in ("one", "all"):
        got = rows(old, captions)
        assert len(got) == read_manifest(old).count("train")
        assert all(key == sample_key for key, _, _, sample_key in got)
    assert [r[:3] for r in rows(new, "all")] == [r[:3] for r in rows(old, "all")]
    assert len(rows(new, "one")) == read_manifest(new).count("train")


def test_feature_cache_inputs_are_per_image_and_per_caption(sharded):
    shard_dir, _ = sharded
    ref = split_shards(shard_dir, "train")[0]
    samples = raw_samples(shard_dir, "train")
    images = list(_inputs(ref.url, "image"))
    entry = read_manifest(shard_dir).splits["train"].shards[0]
    assert len(images) == entry.count and [k for k, _ in images] == [
        s["__key__"] for s in samples[: entry.count]
    ]
    texts = list(_inputs(ref.url, "text"))
    assert len(texts) == entry.pairs
    rows = {r["__key__"]: r["txt"] for r in iterate_split(shard_dir, "train")}
    assert all(rows[k] == t.decode() for k, t in texts)
