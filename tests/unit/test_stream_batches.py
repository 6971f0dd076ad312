"""ingest and align stream in fixed batches: their outputs must not depend on where batches end.

Duplicates whose kept copy is in an earlier batch, paths referenced again many batches later,
unreferenced files and missing ones all cross batch boundaries when the batches are 3 rows.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import mmpipe.align
import mmpipe.ingest
import mmpipe.keys
from mmpipe.align import run_align
from mmpipe.config import AlignParams, IngestParams
from mmpipe.ingest import run_ingest
from mmpipe.io import read_json, read_jsonl


def _image(k: int, fmt: str = "JPEG") -> bytes:
    im = Image.new("RGB", (20 + k % 5, 16), ((41 * k) % 256, (97 * k) % 256, 90))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def messy_root(tmp_path) -> Path:
    """25 files: copies of earlier bytes, a PNG named .jpg, a truncated and an unreferenced one."""
    root = tmp_path / "data"
    (root / "images" / "sub").mkdir(parents=True)
    names = []
    for k in range(24):
        name = f"images/{'sub/' if k % 4 == 0 else ''}f{(k * 7) % 24:02d}.jpg"
        data = _image(k % 9, "PNG" if k == 5 else "JPEG")  # k >= 9: same bytes as k - 9
        if k == 11:
            data = data[: len(data) // 2]
        (root / name).write_bytes(data)
        names.append(name)
    (root / "images" / "zz_unreferenced.jpg").write_bytes(_image(50))
    rows = ["image,caption,label"]
    for i in range(40):  # references out of path order, repeated, some to missing files
        ref = names[(i * 7) % 22] if i % 7 else f"images/missing{i % 3}.jpg"
        rows.append(f"{ref},caption {i},{'ab'[i % 2] if i % 3 else ''}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


def _run(root: Path, out: Path) -> dict:
    p = IngestParams(source="folder", root=str(root), captions="captions.csv", workers=1)
    ingest = run_ingest(p, out / "ingest")
    align = run_align(out / "ingest", AlignParams(), out / "align")
    return {
        "ingest": {k: v for k, v in ingest.items() if k not in ("seconds", "images_per_second")},
        "align": {k: v for k, v in align.items() if k != "seconds"},
        "rejects": read_jsonl(out / "ingest" / "rejects.jsonl"),
        "orphans": read_jsonl(out / "align" / "orphans.jsonl"),
        **{
            name: pd.read_parquet(out / stage / f"{name}.parquet")
            for stage, name in (("ingest", "records"), ("ingest", "images"), ("align", "pairs"))
        },
    }


def test_outputs_do_not_depend_on_batch_boundaries(messy_root, tmp_path, monkeypatch):
    whole = _run(messy_root, tmp_path / "whole")
    for module, name in (
        (mmpipe.ingest, "BATCH"),
        (mmpipe.ingest, "LOOKUP_BATCH"),
        (mmpipe.keys, "SLICE"),
        (mmpipe.align, "BATCH"),
    ):
        monkeypatch.setattr(module, name, 3)
    small = _run(messy_root, tmp_path / "small")
    for key in ("ingest", "align", "rejects", "orphans"):
        assert small[key] == whole[key], key
    for key in ("records", "images", "pairs"):
        pd.testing.assert_frame_equal(small[key], whole[key])
    # the data really is messy: every count adds up and each kind of outcome occurs
    report = read_json(tmp_path / "small" / "ingest" / "report.json")
    images = report["images"]
    assert images["seen"] == images["accepted"] + images["rejected"] == 25
    assert images["by_reason"]["duplicate"] == 13 and len(images["by_reason"]) == 2  # + the cut one
    assert {"missing_image", "image_rejected"} <= set(report["captions"]["by_reason"])
    assert whole["align"]["orphan_images"] > 0  # unreferenced files were validated and kept
    dups = [r for r in whole["rejects"] if r["reason"] == "duplicate"]
    kept = set(whole["images"]["rel_path"])
    assert dups and all(r["duplicate_of"] in kept for r in dups)
