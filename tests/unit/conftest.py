"""Unit fixtures: a tiny ingest output (real JPEG/PNG files) and hand-written WebDataset shards.

Both follow the stages' output schemas (ingest.RECORD_SCHEMA / IMAGE_SCHEMA, the shard sample
of shard._sample) directly, so align/shard/data tests do not depend on ingest.py or
on each other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import webdataset as wds
from PIL import Image

LABELS = ["cat", "dog", None]


def _image_bytes(k: int, fmt: str, size: tuple[int, int]) -> bytes:
    """A small distinct image: colour from k, a bright block whose position also depends on k."""
    img = Image.new("RGB", size, ((37 * k) % 256, (91 * k) % 256, (53 * k + 40) % 256))
    img.paste((255, 255, 255), (k % 5, k % 3, k % 5 + 4, k % 3 + 4))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _caption_row(
    image_ref: str, image_id: str | None, caption: str, label: str | None, line: int
) -> dict:
    cid = hashlib.sha256(f"{image_ref}\x00{caption}\x00{line}".encode()).hexdigest()[:16]
    return {
        "caption_id": cid,
        "caption": caption,
        "image_ref": image_ref,
        "image_id": image_id,
        "label": label,
        "source": "folder",
        "line": line,
        "meta": json.dumps({"row": line}),
    }


def write_ingest(out_dir: Path, root: Path, n_images: int = 10, start: int = 0) -> Path:
    """records.parquet + images.parquet for images start..start+n_images-1 (k captions-ish each).

    Image k gets 1 + k % 3 captions, label LABELS[k % 3]; image ``start`` is an orphan (no
    caption); two orphan captions: a missing image (image_id null) and an unknown image_id;
    ``dup.jpg`` is a byte copy of image start+1 whose caption carries the canonical image_id.
    """
    root.mkdir(parents=True, exist_ok=True)
    images, records, line = [], [], 0
    for k in range(start, start + n_images):
        fmt, ext = ("PNG", "png") if k % 4 == 3 else ("JPEG", "jpg")
        data = _image_bytes(k, fmt, (24 + k % 7, 16 + k % 5))
        path = root / f"img{k:03d}.{ext}"
        path.write_bytes(data)
        image_id = hashlib.sha256(data).hexdigest()[:16]
        with Image.open(path) as im:
            w, h = im.size
        images.append(
            {
                "image_id": image_id,
                "rel_path": path.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "width": w,
                "height": h,
                "format": fmt,
                "bytes": len(data),
            }
        )
        if k == start:
            continue  # orphan image
        for c in range(1 + k % 3):
            line += 1
            records.append(
                _caption_row(path.name, image_id, f"picture {k} caption {c}", LABELS[k % 3], line)
            )
    dup_src = images[1]
    (root / "dup.jpg").write_bytes((root / dup_src["rel_path"]).read_bytes())
    line += 1
    records.append(
        _caption_row("dup.jpg", dup_src["image_id"], "a duplicate's caption", "cat", line)
    )
    line += 1
    records.append(_caption_row("missing.jpg", None, "caption of a missing image", "dog", line))
    line += 1
    records.append(_caption_row("gone.jpg", "f" * 16, "caption of an unknown image", None, line))
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(out_dir / "records.parquet", index=False)
    pd.DataFrame(images).to_parquet(out_dir / "images.parquet", index=False)
    # ingest records where the data root is, relative to the ingest dir (shard reads it)
    data_root = os.path.relpath(root.resolve(), out_dir.resolve())
    (out_dir / "report.json").write_text(json.dumps({"data_root": data_root}))
    return out_dir


@pytest.fixture
def make_ingest(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write_ingest into tmp_path/ingest (images under tmp_path/raw)."""

    def make(n_images: int = 10, start: int = 0, name: str = "ingest") -> Path:
        return write_ingest(tmp_path / name, tmp_path / "raw", n_images, start)

    return make


def write_shards(out_dir: Path, counts: dict[str, list[int]], size: int = 8) -> Path:
    """Hand-written shards + manifest: counts[split] = samples per shard; 2 samples per image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, per_shard in counts.items():
        shards, n = [], 0
        for s, count in enumerate(per_shard):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(out_dir / name), mtime=0) as tw:
                for _ in range(count):
                    key = f"{split}{n:05d}"
                    meta = {
                        "pair_id": key,
                        "image_id": f"{split}img{n // 2}",
                        "caption_id": key,
                        "label": LABELS[n % 2],
                        "label_index": n % 2,
                        "split": split,
                        "source": "test",
                        "image_path": "",
                        "meta": {"n": n},
                        "copy": 0,
                    }
                    img = Image.new("RGB", (size, size), (n % 256, (n * 7) % 256, 0))
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=95)
                    tw.write(
                        {
                            "__key__": key,
                            "jpg": buf.getvalue(),
                            "txt": f"caption {n}",
                            "json": json.dumps(meta).encode(),
                        }
                    )
                    n += 1
            shards.append(
                {
                    "name": name,
                    "count": count,
                    "bytes": (out_dir / name).stat().st_size,
                    "sha256": hashlib.sha256((out_dir / name).read_bytes()).hexdigest(),
                }
            )
        splits[split] = {"count": n, "shards": shards}
    manifest = {
        "params_hash": "test",
        "image_size": size,
        "classes": ["cat", "dog"],
        "splits": splits,
        "align_report_pairs_per_split": {},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write_shards into tmp_path/shards."""

    def make(counts: dict[str, list[int]], size: int = 8) -> Path:
        return write_shards(tmp_path / "shards", counts, size)

    return make
