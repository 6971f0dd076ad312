"""The default data path (ingest.image_check: header, curate all off) on real COCO photos with
four broken files among them: each broken image is a named reject (ingest's when its header or
end marker tells, shard's when only a decode does), its captions accounted for, and every count
adds up from ingest to the shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from mmpipe import pipeline
from mmpipe.config import load_params
from mmpipe.io import read_json, read_jsonl
from mmpipe.layout import Layout
from mmpipe.manifest import read_manifest
from tests.conftest import REPO
from tests.unit.test_image_check import _bad_huffman, _bad_png

BROKEN = {
    "cut.jpg": lambda good: good[: len(good) // 2],  # a truncated download: no end marker
    "garbage.jpg": lambda good: bytes(range(256)) * 8,  # not an image at all
    "huffman.jpg": lambda good: _bad_huffman(7),  # intact structure, undecodable data
    "zeroed.png": lambda good: _bad_png(8),
}


def _coco_with_broken_files(shared_data: Path, dest: Path) -> Path:
    """coco-mini (24 photos, 5 captions each) plus BROKEN, two captions each."""
    shutil.copytree(shared_data / "coco-mini", dest)
    doc = json.loads((dest / "captions.json").read_text())
    good = (dest / "images" / doc["images"][0]["file_name"]).read_bytes()
    for k, (name, make) in enumerate(BROKEN.items()):
        (dest / "images" / name).write_bytes(make(good))
        doc["images"].append({"id": 900 + k, "file_name": name, "width": 48, "height": 40})
        for c in range(2):
            doc["annotations"].append(
                {"id": 9000 + 10 * k + c, "image_id": 900 + k, "caption": f"{name} caption {c}"}
            )
    (dest / "captions.json").write_text(json.dumps(doc))
    return dest


def test_default_path_names_every_broken_image_and_the_counts_add_up(shared_data, tmp_path):
    root = _coco_with_broken_files(shared_data, tmp_path / "coco")
    sets = [
        "ingest.source=coco",
        f"ingest.root={root}",
        "ingest.captions=captions.json",
        "ingest.workers=1",
        "shard.image_size=32",
        "shard.copies=0",
        "shard.workers=1",
    ]
    params = load_params(REPO / "params.yaml", sets)  # the shipped defaults otherwise
    assert params.ingest.image_check == "header" and not params.curate.near_duplicates
    layout = Layout(tmp_path / "project")
    reports = {s: pipeline.run_data_stage(s, params, layout) for s in pipeline.ORDER[:4]}
    assert list(reports) == ["ingest", "curate", "align", "shard"]

    ingest = read_json(layout.ingest_dir / "report.json")
    assert ingest["image_check"] == "header"
    assert ingest["images"] == {
        "seen": 28,
        "accepted": 26,
        "rejected": 2,
        "by_reason": {"not_an_image": 1, "truncated": 1},
    }
    assert ingest["captions"]["seen"] == 120 + 8
    assert ingest["captions"]["by_reason"] == {"image_rejected": 4}
    named = {(r["file"], r["reason"]) for r in read_jsonl(layout.ingest_dir / "rejects.jsonl")}
    assert {("images/cut.jpg", "truncated"), ("images/garbage.jpg", "not_an_image")} <= named

    curate = read_json(layout.curate_dir / "report.json")
    assert curate["pairs"]["in"] == curate["pairs"]["kept"] == 124  # all off: nothing decoded

    rejects = read_jsonl(layout.shard_dir / "rejects.jsonl")
    assert (
        sorted(r["file"] for r in rejects) == ["images/huffman.jpg"] * 2 + ["images/zeroed.png"] * 2
    )
    assert {r["reason"] for r in rejects} == {"undecodable_image"}
    manifest = read_json(layout.shard_dir / "manifest.json")
    pairs_in = manifest["align_report_pairs_per_split"]
    rejected = manifest["rejected_pairs_per_split"]
    shards = read_manifest(layout.shard_dir)
    for split, entry in shards.splits.items():
        assert entry.pairs == pairs_in[split] - rejected[split], split  # copies=0
    assert sum(pairs_in.values()) == pq.read_metadata(layout.align_dir / "pairs.parquet").num_rows
    assert sum(pairs_in.values()) == 124 and sum(rejected.values()) == 4
    assert sum(e.pairs for e in shards.splits.values()) == 120
    images = pq.read_table(layout.align_dir / "pairs.parquet", columns=["image_id"])
    # a sample per image: the decodable ones (the two rejected images had two pairs each)
    assert sum(e.count for e in shards.splits.values()) == len(set(images["image_id"])) - 2
