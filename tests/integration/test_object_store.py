"""Shards on an S3 store (the local moto server): the shard stage publishes its committed output
to ``shard.output``, and the loader trains/evaluates from that URL as from the local directory."""

from __future__ import annotations

import json

import pytest

from mmpipe import pipeline, storage
from mmpipe.config import load_params
from mmpipe.data import create_dataloader, iterate_split
from mmpipe.errors import InputError
from mmpipe.layout import Layout
from tests.conftest import REPO, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def _s3fs(s3):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})


def test_shard_stage_publishes_and_the_loader_reads_the_url(tmp_path, s3):
    url = s3.url("shards", tmp_path.name)
    params = load_params(REPO / "params.yaml", [*TINY_OVERRIDES, f"shard.output={url}"])
    layout = Layout(tmp_path)
    for stage in ("ingest", "curate", "align"):
        pipeline.run_stage(stage, params, layout)
    report = pipeline.run_stage("shard", params, layout)
    published = report["published"]
    assert published["uploaded"] >= 3 and published["reused"] == 0

    fs = _s3fs(s3)
    bucket_path = url.removeprefix("s3://")
    pointer = json.loads(fs.cat_file(f"{bucket_path}/LATEST"))
    local_manifest = (layout.shard_dir / "manifest.json").read_bytes()
    assert fs.cat_file(f"{bucket_path}/{pointer['version']}/manifest.json") == local_manifest
    for split in ("train", "val", "test"):
        remote = [(s["__key__"], s["jpg"]) for s in iterate_split(url, split)]
        assert remote == [(s["__key__"], s["jpg"]) for s in iterate_split(layout.shard_dir, split)]
    n_train = json.loads(local_manifest)["splits"]["train"]["pairs"]  # "all": every caption
    # two loader worker processes open s3:// through fsspec too
    loader = create_dataloader(url, "train", 16, num_workers=2, shuffle_buffer=8, seed=3)
    assert sum(len(b["text"]) for b in loader) == n_train


def test_a_shard_cut_on_the_store_fails_naming_it(tmp_path, s3):
    from tests.conftest import write_mood_shards

    url = s3.url("cut", tmp_path.name)
    out = storage.publish_shards(write_mood_shards(tmp_path / "s"), url)
    fs = _s3fs(s3)
    victim = f"{out['url'].removeprefix('s3://')}/train-000001.tar"
    fs.pipe_file(victim, fs.cat_file(victim)[:1024])
    with pytest.raises(InputError, match=r"train-000001\.tar: 1024 bytes, manifest.json says"):
        list(create_dataloader(url, "train", 4))


def _stage_shards(params, layout) -> dict[str, bytes]:
    for stage in ("ingest", "curate", "align", "shard"):
        pipeline.run_stage(stage, params, layout)
    return {p.name: p.read_bytes() for p in sorted(layout.shard_dir.glob("*.tar"))}


def test_a_source_on_s3_gives_the_same_shards_as_its_local_copy(shared_data, tmp_path, s3):
    """ingest.root = s3://.../coco-mini: the same records and shard bytes as the local folder;
    a second night fetches nothing and is current; a changed object makes ingest run again."""
    fs = _s3fs(s3)
    url = s3.url("sources", tmp_path.name, "coco-mini")
    fs.put(str(shared_data / "coco-mini"), url.removeprefix("s3://"), recursive=True)
    coco = ["ingest.source=coco", "ingest.captions=captions.json", "ingest.labels_file=labels.csv"]
    local = load_params(
        REPO / "params.yaml", [*TINY_OVERRIDES, *coco, f"ingest.root={shared_data / 'coco-mini'}"]
    )
    remote = load_params(REPO / "params.yaml", [*TINY_OVERRIDES, *coco, f"ingest.root={url}"])
    here, there = Layout(tmp_path / "local"), Layout(tmp_path / "remote")
    assert _stage_shards(remote, there) == _stage_shards(local, here)
    for name in ("records.parquet", "images.parquet"):
        assert (there.ingest_dir / name).read_bytes() == (here.ingest_dir / name).read_bytes()

    assert pipeline.stage_is_current("ingest", remote, there)  # listing unchanged: cached
    again = storage.mirror(url, tmp_path / "m")
    assert again["fetched"] == again["objects"] > 20
    assert storage.mirror(url, tmp_path / "m")["fetched"] == 0
    fs.pipe_file(f"{url.removeprefix('s3://')}/labels.csv", b"file_name,label\n")
    assert not pipeline.stage_is_current("ingest", remote, there)
    assert storage.mirror(url, tmp_path / "m")["fetched"] == 1
