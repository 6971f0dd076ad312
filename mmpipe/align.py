"""Stage `align`: pair accepted images with their captions, account for orphans, split by image.

One image has many captions; a split is decided per image_id (hash of seed + image_id), so all
captions of an image, and byte-identical duplicate images (ingest gives them the canonical
image_id), always land in the same split, and adding data never moves existing images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mmpipe.config import AlignParams, section_hash
from mmpipe.errors import InputError
from mmpipe.io import atomic_path, write_json_atomic, write_jsonl_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RECORD_COLUMNS = ("caption_id", "caption", "image_ref", "image_id", "label", "meta")
IMAGE_COLUMNS = ("image_id", "path", "rel_path")
PAIR_COLUMNS = (
    "pair_id",
    "image_id",
    "caption_id",
    "caption",
    "label",
    "label_index",
    "split",
    "image_path",
    "meta",
)

# orphan reason codes (orphans.jsonl, report.orphan_captions_by_reason)
NO_CAPTION = "no_caption"
IMAGE_REJECTED = "image_missing_or_rejected"  # ingest could not accept the caption's image
IMAGE_UNKNOWN = "image_not_accepted"  # image_id set but not among the accepted images


def split_of(image_id: str, p: AlignParams) -> str:
    """The split of one image group: u = sha256(f"{seed}:{image_id}")[:15] / 16**15 (CONTRACT)."""
    u = int(hashlib.sha256(f"{p.seed}:{image_id}".encode()).hexdigest()[:15], 16) / 16**15
    if u < p.train:
        return "train"
    return "val" if u < p.train + p.val else "test"


def _read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Read an ingest parquet, checking it exists and has the contract's columns."""
    if not path.is_file():
        raise InputError(f"{path}: ingest output not found; run `mmpipe ingest` first")
    try:
        df = pd.read_parquet(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: unreadable parquet ({exc}); run `mmpipe ingest` again") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; run `mmpipe ingest` again"
        )
    return df


def read_ingest(ingest_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """records.parquet and images.parquet, with nulls as None and unique ids checked."""
    records = _read_table(ingest_dir / "records.parquet", RECORD_COLUMNS)
    images = _read_table(ingest_dir / "images.parquet", IMAGE_COLUMNS)
    records = records.astype(object).where(records.notna(), None)
    images = images.astype(object).where(images.notna(), None)
    for df, col, name in ((records, "caption_id", "records"), (images, "image_id", "images")):
        dup = df[col][df[col].duplicated()]
        if len(dup):
            raise InputError(f"{ingest_dir / (name + '.parquet')}: duplicate {col} {dup.iloc[0]!r}")
    return records, images


def build_pairs(records: pd.DataFrame, images: pd.DataFrame, p: AlignParams) -> pd.DataFrame:
    """One row per caption whose image was accepted, with split and label_index, sorted."""
    paths = dict(zip(images["image_id"], images["path"], strict=True))
    keep = records[records["image_id"].isin(paths.keys())]
    labels = sorted({lab for lab in keep["label"] if lab is not None})
    index = {lab: i for i, lab in enumerate(labels)}
    pairs = pd.DataFrame(
        {
            "pair_id": keep["caption_id"].astype(str),
            "image_id": keep["image_id"].astype(str),
            "caption_id": keep["caption_id"].astype(str),
            "caption": keep["caption"].astype(str),
            "label": keep["label"],
            "label_index": [index.get(lab, -1) for lab in keep["label"]],
            "split": [split_of(i, p) for i in keep["image_id"]],
            "image_path": [paths[i] for i in keep["image_id"]],
            "meta": [m if m is not None else "{}" for m in keep["meta"]],
        }
    )
    pairs["label_index"] = pairs["label_index"].astype("int64")
    return pairs.sort_values(["split", "image_id", "caption_id"], kind="stable").reset_index(
        drop=True
    )


def find_orphans(records: pd.DataFrame, images: pd.DataFrame) -> list[dict[str, Any]]:
    """Accepted images no caption points to, and captions without an accepted image."""
    accepted = set(images["image_id"])
    used = set(records["image_id"].dropna())
    rows = [
        {"kind": "image", "id": i, "ref": ref, "reason": NO_CAPTION}
        for i, ref in zip(images["image_id"], images["rel_path"], strict=True)
        if i not in used
    ]
    for cid, ref, iid in zip(
        records["caption_id"], records["image_ref"], records["image_id"], strict=True
    ):
        if iid is None:
            rows.append({"kind": "caption", "id": cid, "ref": ref, "reason": IMAGE_REJECTED})
        elif iid not in accepted:
            rows.append({"kind": "caption", "id": cid, "ref": ref, "reason": IMAGE_UNKNOWN})
    return sorted(rows, key=lambda r: (r["kind"], r["id"]))


def make_report(
    records: pd.DataFrame,
    images: pd.DataFrame,
    pairs: pd.DataFrame,
    orphans: list[dict[str, Any]],
    p: AlignParams,
) -> dict[str, Any]:
    """The align report (CONTRACT.md), with the accounting identities asserted."""
    by_reason: dict[str, int] = {}
    for o in orphans:
        if o["kind"] == "caption":
            by_reason[o["reason"]] = by_reason.get(o["reason"], 0) + 1
    groups = pairs.drop_duplicates("image_id")
    report = {
        "images": len(images),
        "captions": len(records),
        "pairs": len(pairs),
        "orphan_images": sum(o["kind"] == "image" for o in orphans),
        "orphan_captions": sum(by_reason.values()),
        "orphan_captions_by_reason": dict(sorted(by_reason.items())),
        "images_per_split": {s: int((groups["split"] == s).sum()) for s in SPLITS},
        "pairs_per_split": {s: int((pairs["split"] == s).sum()) for s in SPLITS},
        "classes": sorted({lab for lab in pairs["label"] if lab is not None}),
        "params_hash": section_hash(p),
    }
    # every accepted record is either paired or an orphan, never both, never lost
    assert report["images"] == len(groups) + report["orphan_images"], report
    assert report["captions"] == report["pairs"] + report["orphan_captions"], report
    assert sum(report["pairs_per_split"].values()) == report["pairs"], report
    assert (pairs.groupby("image_id")["split"].nunique() <= 1).all(), "an image in two splits"
    return report


def run_align(ingest_dir: Path, p: AlignParams, out_dir: Path) -> dict[str, Any]:
    """Write pairs.parquet, orphans.jsonl and report.json (last) into out_dir; return the report."""
    start = time.perf_counter()
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    records, images = read_ingest(ingest_dir)
    pairs = build_pairs(records, images, p)
    if pairs.empty:
        raise InputError(f"{ingest_dir}: no caption points to an accepted image; nothing to align")
    orphans = find_orphans(records, images)
    report = make_report(records, images, pairs, orphans, p)
    for split, n in report["pairs_per_split"].items():
        if n == 0:
            log.warning(
                "align: split %r is empty (%d image groups in total)",
                split,
                sum(report["images_per_split"].values()),
            )
    with atomic_path(out_dir / "pairs.parquet") as tmp:
        pairs[list(PAIR_COLUMNS)].to_parquet(tmp, index=False)
    write_jsonl_atomic(out_dir / "orphans.jsonl", orphans)
    write_json_atomic(out_dir / "report.json", report)
    log.info(
        "align: %d pairs, %d orphan images, %d orphan captions in %.1fs (%s)",
        report["pairs"],
        report["orphan_images"],
        report["orphan_captions"],
        time.perf_counter() - start,
        json.dumps(report["pairs_per_split"]),
    )
    return report
