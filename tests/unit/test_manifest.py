"""mmpipe.manifest: the typed shard manifest keeps manifest.json's bytes (a DVC output), reads
manifests older than its newest fields, and refuses what it cannot read in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpipe.align import run_align
from mmpipe.config import AlignParams, ShardParams
from mmpipe.errors import InputError
from mmpipe.io import write_json_atomic
from mmpipe.manifest import MANIFEST, VERSION, Manifest, read_manifest, write_manifest
from mmpipe.shard import run_shard

# what shard writes: a new key changes every manifest's bytes, hence every data version's hash
WRITTEN = {
    "params_hash", "image_size", "decode", "classes", "labels", "labelled_pairs_per_split",
    "label_separator", "multi_label_pairs", "unknown_label_pairs_per_split", "splits",
    "align_report_pairs_per_split",
}  # fmt: skip
SHARD = {"name": "train-000000.tar", "count": 3, "bytes": 10240, "sha256": "ab" * 32}


def _rewritten(source: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "again"
    out.mkdir()
    write_manifest(read_manifest(source), out)
    return (out / MANIFEST).read_bytes()


def test_what_shard_wrote_reads_and_writes_back_byte_identical(make_ingest, tmp_path):
    ingest = make_ingest(n_images=12)
    run_align(ingest, AlignParams(train=0.5, val=0.25, test=0.25), tmp_path / "align")
    params = ShardParams(image_size=16, workers=1, copies=1, maxcount=1000)
    run_shard(tmp_path / "align", ingest, params, tmp_path / "shards")
    written = (tmp_path / "shards" / MANIFEST).read_bytes()
    assert set(json.loads(written)) == WRITTEN
    assert _rewritten(tmp_path / "shards", tmp_path) == written


def test_every_optional_field_round_trips(tmp_path):
    data = {
        "params_hash": "0123456789abcdef", "image_size": 64, "decode": "full",
        "classes": ["a", "é"], "labels": "partial",
        "labelled_pairs_per_split": {"train": 2, "val": 0, "test": 1},
        "label_separator": "|", "multi_label_pairs": 1,
        "unknown_label_pairs_per_split": {"train": 0, "val": 0, "test": 0},
        "splits": {"train": {"count": 3, "shards": [SHARD]}, "val": {"count": 0, "shards": []}},
        "align_report_pairs_per_split": {"train": 3, "val": 0, "test": 0},
        "rejected_pairs_per_split": {"train": 1, "val": 0, "test": 0},
        "audio": {"member": "flac", "sample_rate": 16000,
                  "pairs_with_audio_per_split": {"train": 2, "val": 0, "test": 0}},
    }  # fmt: skip
    write_json_atomic(tmp_path / MANIFEST, data)
    manifest = read_manifest(tmp_path)
    assert manifest.audio is not None and manifest.audio.sample_rate == 16000
    assert manifest.splits["train"].shards[0].sha256 == SHARD["sha256"]
    assert _rewritten(tmp_path, tmp_path) == (tmp_path / MANIFEST).read_bytes()


def test_the_oldest_manifests_read_with_the_defaults(tmp_path):
    """The first manifests had five fields; later ones are read with each field's default."""
    old = {"params_hash": "x", "image_size": 32, "classes": ["cat", "dog"],
           "splits": {"train": {"count": 3, "shards": [SHARD]}},
           "align_report_pairs_per_split": {"train": 3}}  # fmt: skip
    write_json_atomic(tmp_path / MANIFEST, old)
    manifest = read_manifest(tmp_path)
    assert (manifest.version, manifest.decode, manifest.labels) == (VERSION, "reduced", "unknown")
    assert manifest.labelled("train") and manifest.labelled("test")  # they list classes
    assert manifest.audio is None and manifest.rejected_pairs_per_split is None
    assert manifest.count("train") == 3 and manifest.count("val") == 0
    assert not Manifest.model_validate({**old, "classes": []}).labelled("train")
    assert _rewritten(tmp_path, tmp_path) == (tmp_path / MANIFEST).read_bytes()


def test_labelled_follows_the_counts_when_there_are_counts():
    manifest = Manifest(splits={}, classes=["a"], labelled_pairs_per_split={"train": 4, "test": 0})
    assert manifest.labelled("train") and not manifest.labelled("test")
    assert not manifest.labelled("val")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "not valid JSON"),
        (json.dumps({"classes": []}), "no 'splits' mapping"),
        (json.dumps({"version": VERSION + 1, "splits": {}}), f"version {VERSION + 1}"),
        (json.dumps({"splits": {"train": {"count": "many"}}}), r"splits\.train\.count"),
        (json.dumps({"splits": {}, "colour": "red"}), "colour"),
    ],
)
def test_an_unreadable_manifest_is_one_line_naming_the_file(tmp_path, content, message):
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(InputError, match=message) as caught:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(caught.value) and "\n" not in str(caught.value)


def test_missing_manifest_and_empty_required_split(tmp_path):
    with pytest.raises(InputError, match="run `mmpipe shard` first"):
        read_manifest(tmp_path)
    write_json_atomic(tmp_path / MANIFEST, {"splits": {"train": {"count": 0, "shards": []}}})
    with pytest.raises(InputError, match="the train split is empty"):
        read_manifest(tmp_path, require="train")
