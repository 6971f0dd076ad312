"""Object-store URLs (mmpipe.storage): publishing a shard set as version + pointer, and the loader
reading it back; on fsspec's in-memory filesystem (the S3 server tests are in integration)."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest

from mmpipe import storage
from mmpipe.data import create_dataloader, iterate_split
from mmpipe.errors import InputError
from tests.conftest import write_mood_shards


@pytest.fixture
def url() -> str:
    """A fresh prefix on fsspec's process-wide memory filesystem."""
    return f"memory://shards-{uuid.uuid4().hex[:8]}"


def test_is_url_and_redact():
    assert storage.is_url("s3://b/p") and storage.is_url("memory://x")
    assert not storage.is_url("/data/shards") and not storage.is_url("file:///data/shards")
    assert not storage.is_url("data/s3:/x")
    assert storage.redact("postgresql://mlflow:s3cret@db:5432/m") == "postgresql://***@db:5432/m"
    assert storage.redact("s3://bucket/p") == "s3://bucket/p"


def test_published_shards_read_back_sample_for_sample(tmp_path, url):
    local = write_mood_shards(tmp_path / "shards", per_shard=6)
    (local / "rejects.jsonl").write_text('{"file": "images/x.jpg"}\n')  # header mode's rejects
    out = storage.publish_shards(local, url)
    with fsspec.open(f"{out['url']}/rejects.jsonl", "rb") as fh:
        assert fh.read() == (local / "rejects.jsonl").read_bytes()
    assert out["uploaded"] == len(list(local.glob("*.tar"))) and out["reused"] == 0
    for split in ("train", "val"):
        remote = list(iterate_split(url, split))
        here = list(iterate_split(local, split))
        assert [s["__key__"] for s in remote] == [s["__key__"] for s in here]
        assert [s["jpg"] for s in remote] == [s["jpg"] for s in here]
    batches = list(create_dataloader(url, "train", 8))
    assert sum(len(b["text"]) for b in batches) == 32  # 16 images x 2 captions
    # the same set again: nothing uploaded, the pointer names the same version
    again = storage.publish_shards(local, url)
    assert (again["version"], again["uploaded"]) == (out["version"], 0)


def test_a_reader_sees_the_old_version_or_the_new_never_a_mix(tmp_path, url):
    old = storage.publish_shards(write_mood_shards(tmp_path / "a", seed=1), url)
    fs = fsspec.filesystem("memory")
    seen_before = storage.resolve_shards(url)[0]
    new = storage.publish_shards(write_mood_shards(tmp_path / "b", seed=2), url)
    assert old["version"] != new["version"]
    assert seen_before.endswith(old["version"]) and storage.resolve_shards(url)[0] == new["url"]
    # the old version stays whole for a reader that resolved it before the switch (pinned)
    assert len(list(iterate_split(seen_before, "train"))) == 32
    fs.pipe_file(seen_before.replace("memory://", "/") + "/manifest.json", b"{}")
    with pytest.raises(InputError, match="sha256 differs from .*v-[0-9a-f]{16}'s"):
        iterate_split(seen_before, "train").__next__()


def test_a_replaced_object_fails_naming_it(tmp_path, url):
    out = storage.publish_shards(write_mood_shards(tmp_path / "s"), url)
    fs = fsspec.filesystem("memory")
    victim = f"{out['url']}/train-000000.tar".replace("memory://", "/")
    fs.pipe_file(victim, b"not a tar")
    with pytest.raises(InputError, match=r"train-000000\.tar: 9 bytes, manifest.json says \d+"):
        create_dataloader(url, "train", 4)


def test_a_manifest_modified_after_publishing_is_refused(tmp_path, url):
    out = storage.publish_shards(write_mood_shards(tmp_path / "s"), url)
    fs = fsspec.filesystem("memory")
    path = f"{out['url']}/manifest.json".replace("memory://", "/")
    manifest = json.loads(fs.cat_file(path))
    manifest["splits"]["train"]["count"] += 1
    fs.pipe_file(path, json.dumps(manifest).encode())
    with pytest.raises(InputError, match="sha256 differs from .*LATEST"):
        create_dataloader(url, "train", 4)


def test_no_pointer_is_a_clear_error(url):
    with pytest.raises(InputError, match=r"LATEST: no such object"):
        create_dataloader(url, "train", 4)


def test_where_shards_are_published_changes_no_byte_of_them():
    from mmpipe.config import ShardParams
    from mmpipe.shard import output_params_hash

    published = ShardParams(output="s3://bucket/shards")
    assert output_params_hash(published) == output_params_hash(ShardParams())
    assert output_params_hash(ShardParams(seed=1)) != output_params_hash(ShardParams())


def test_a_failed_publication_leaves_the_shard_stage_uncommitted(tmp_path, url, monkeypatch):
    """Published before the local commit: a failure means the next run shards and publishes."""
    from mmpipe import pipeline
    from mmpipe.config import load_params
    from mmpipe.layout import Layout
    from tests.conftest import REPO, TINY_OVERRIDES

    params = load_params(REPO / "params.yaml", [*TINY_OVERRIDES, f"shard.output={url}"])
    layout = Layout(tmp_path)
    for stage in ("ingest", "curate", "align"):
        pipeline.run_stage(stage, params, layout)
    real, fail = pipeline.publish_shards, [True]

    def flaky(shard_dir, target):
        if fail[0]:
            raise OSError("connection reset by peer")
        return real(shard_dir, target)

    monkeypatch.setattr(pipeline, "publish_shards", flaky)
    with pytest.raises(OSError, match="connection reset"):
        pipeline.run_stage("shard", params, layout)
    assert not (layout.shard_dir / "manifest.json").exists()
    assert not pipeline.stage_is_current("shard", params, layout)
    fail[0] = False
    published = pipeline.run_stage("shard", params, layout)["published"]
    _, manifest = storage.resolve_shards(url)
    assert manifest == json.loads((layout.shard_dir / "manifest.json").read_text())
    assert published["uploaded"] == len(list(layout.shard_dir.glob("*.tar")))
