"""Ingest the real samples in ../shared/data (see its README.md) and check the derived counts."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq

from mmpipe.config import IngestParams
from mmpipe.ingest import run_ingest
from mmpipe.io import read_jsonl


def _tables(out):
    records = pq.read_table(out / "records.parquet").to_pylist()
    images = pq.read_table(out / "images.parquet").to_pylist()
    return records, images, read_jsonl(out / "rejects.jsonl")


def test_flickr30k_sample_folder_jsonl(shared_data, tmp_path):
    # 11 .jpg files; 1/2/3/4945942737.jpg are byte-identical, so 1.jpg (first in sorted order)
    # is canonical and the other 3 are duplicates -> 8 accepted. captions.jsonl has 25 lines
    # over 5 files (1, 2, 3, 4945942737, 6338542128): all valid; the 20 on the 4 copies share
    # 1.jpg's image_id. The 6 uncaptioned files are accepted (align makes them orphans).
    root = shared_data / "flickr30k-sample"
    report = run_ingest(
        IngestParams(source="folder", root=str(root), captions="captions.jsonl", workers=2),
        tmp_path,
    )
    assert report["images"] == {
        "seen": 11,
        "accepted": 8,
        "rejected": 3,
        "by_reason": {"duplicate": 3},
    }
    assert report["captions"] == {"seen": 25, "accepted": 25, "rejected": 0, "by_reason": {}}
    records, images, rejects = _tables(tmp_path)
    by_rel = {im["rel_path"]: im for im in images}
    canonical = by_rel["images/1.jpg"]["image_id"]
    assert sorted((r["file"], r["duplicate_of"]) for r in rejects) == [
        ("images/2.jpg", "images/1.jpg"),
        ("images/3.jpg", "images/1.jpg"),
        ("images/4945942737.jpg", "images/1.jpg"),
    ]
    assert sum(r["image_id"] == canonical for r in records) == 20
    assert all(r["image_id"] is not None and r["label"] is None for r in records)
    referenced = {r["image_ref"] for r in records} & set(by_rel)
    assert len(set(by_rel) - referenced) == 6  # uncaptioned images
    assert (by_rel["images/1.jpg"]["width"], by_rel["images/1.jpg"]["height"]) == (333, 500)


def test_coco_mini(shared_data, tmp_path):
    # 24 images, 120 annotations (5 per image), every image_id known, one label per file.
    root = shared_data / "coco-mini"
    report = run_ingest(
        IngestParams(
            source="coco",
            root=str(root),
            captions="captions.json",
            labels_file="labels.csv",
            workers=2,
        ),
        tmp_path,
    )
    assert report["images"] == {"seen": 24, "accepted": 24, "rejected": 0, "by_reason": {}}
    assert report["captions"] == {"seen": 120, "accepted": 120, "rejected": 0, "by_reason": {}}
    records, images, _ = _tables(tmp_path)
    labels = dict(line.split(",", 1) for line in (root / "labels.csv").read_text().splitlines()[1:])
    by_id = {im["image_id"]: im["rel_path"].removeprefix("images/") for im in images}
    assert all(r["label"] == labels[by_id[r["image_id"]]] for r in records)
    assert {r["label"] for r in records} >= {"person", "dining table", "umbrella"}
    assert all(json.loads(r["meta"])["coco_image_id"] for r in records)
    sizes = {im["rel_path"]: (im["width"], im["height"]) for im in images}
    assert sizes["images/000000069468.jpg"] == (427, 640)  # a portrait one
    assert all(im["format"] == "JPEG" for im in images)


def test_visual_entailment_sample(shared_data, tmp_path):
    # pairs.csv: 16 rows, 15 on 2248275918.jpg and 1 on 402978771.jpg; 4 image files, two of
    # them uncaptioned. 'premise' is an extra column -> meta. 3 labels (6 entailment, 6 neutral,
    # 4 contradiction).
    root = shared_data / "visual-entailment-sample"
    report = run_ingest(
        IngestParams(
            source="folder",
            root=str(root),
            captions="pairs.csv",
            caption_column="caption",
            label_column="label",
            workers=1,
        ),
        tmp_path,
    )
    assert report["images"] == {"seen": 4, "accepted": 4, "rejected": 0, "by_reason": {}}
    assert report["captions"] == {"seen": 16, "accepted": 16, "rejected": 0, "by_reason": {}}
    records, _, _ = _tables(tmp_path)
    counts = {
        lab: sum(r["label"] == lab for r in records)
        for lab in ("entailment", "neutral", "contradiction")
    }
    assert counts == {"entailment": 6, "neutral": 6, "contradiction": 4}
    assert [r["line"] for r in records] == list(range(2, 18))
    assert all(set(json.loads(r["meta"])) == {"premise"} for r in records)
    assert len({r["image_id"] for r in records}) == 2


def _pipeline(ingest_params: IngestParams, work, image_size: int = 32) -> dict:
    """ingest -> align -> shard into work/{ingest,align,shards}; the three reports."""
    from mmpipe.align import run_align
    from mmpipe.config import AlignParams, ShardParams
    from mmpipe.shard import run_shard

    ingest = run_ingest(ingest_params, work / "ingest")
    align = run_align(work / "ingest", AlignParams(), work / "align")
    shard_p = ShardParams(image_size=image_size, copies=1, workers=1, maxcount=50)
    shard = run_shard(work / "align", work / "ingest", shard_p, work / "shards")
    return {"ingest": ingest, "align": align, "shard": shard}


def _coco_params(root, labels: bool) -> IngestParams:
    return IngestParams(
        source="coco",
        root=str(root),
        captions="captions.json",
        labels_file="labels.csv" if labels else None,
        workers=1,
    )


def test_unlabelled_flickr_sample_end_to_end(shared_data, tmp_path):
    """docs/your-own-data.md's folder example without labels: ingest -> align -> shard, no crash."""
    from mmpipe.data import iterate_split
    from mmpipe.manifest import read_manifest

    params = IngestParams(
        source="folder",
        root=str(shared_data / "flickr30k-sample"),
        captions="captions.jsonl",
        workers=1,
    )
    reports = _pipeline(params, tmp_path)
    assert reports["align"]["classes"] == [] and reports["align"]["labelled_pairs"] == 0
    manifest = read_manifest(tmp_path / "shards")
    assert manifest.labels == "none" and manifest.classes == []
    samples = list(iterate_split(tmp_path / "shards", "train"))
    assert samples and all(s["json"]["label_index"] == -1 for s in samples)
    assert all(not s["json"]["image_path"].startswith("/") for s in samples)


def test_coco_mini_with_and_without_labels_end_to_end(shared_data, tmp_path):
    from mmpipe.manifest import read_manifest

    root = shared_data / "coco-mini"
    bare = _pipeline(_coco_params(root, labels=False), tmp_path / "bare")
    labelled = _pipeline(_coco_params(root, labels=True), tmp_path / "labelled")
    assert bare["align"]["labelled_pairs"] == 0 and bare["shard"]["labels"] == "none"
    assert labelled["align"]["labelled_pairs"] == 120 == labelled["ingest"]["labelled_captions"]
    assert read_manifest(tmp_path / "labelled" / "shards").labels == "all"
    assert sum(labelled["align"]["pairs_per_class"].values()) == 120


def test_partly_labelled_counts(shared_data, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(shared_data / "coco-mini", root)
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines[:11]) + "\n")  # header + 10 of 24 images
    reports = _pipeline(_coco_params(root, labels=True), tmp_path)
    assert reports["align"]["labelled_pairs"] == 50 and reports["align"]["unlabelled_pairs"] == 70
    assert reports["shard"]["labels"] == "partial"


def test_shards_are_byte_identical_wherever_the_data_lives(shared_data, tmp_path):
    """Same data at two places (and two project dirs): the same shard bytes."""
    import os

    from mmpipe.manifest import read_manifest

    shas = []
    old = os.umask(0o002)  # a group-shared project: outputs must be group-readable
    try:
        for place in ("a/deep/copy", "b"):
            root = tmp_path / place / "coco-mini"
            shutil.copytree(shared_data / "coco-mini", root)
            _pipeline(_coco_params(root, labels=True), tmp_path / f"project-{place[0]}")
            manifest = read_manifest(tmp_path / f"project-{place[0]}" / "shards")
            shas.append([s.sha256 for e in manifest.splits.values() for s in e.shards])
    finally:
        os.umask(old)
    assert shas[0] == shas[1]
    for name in ("ingest/images.parquet", "ingest/records.parquet", "align/pairs.parquet"):
        assert (tmp_path / "project-a" / name).read_bytes() == (
            tmp_path / "project-b" / name
        ).read_bytes(), name
    for path in (tmp_path / "project-b").rglob("*"):
        if path.is_file() and "source" not in path.parts:
            assert path.stat().st_mode & 0o777 == 0o664, path
