"""The bare loop of issue 28: shard's per-photo work and nothing else, for bench_img2dataset.

``python benchmarks/_bare_loop.py SRC OUT.tar``: for each row of SRC/captions.csv, read the
photo, decode it as shard does (libjpeg-turbo through simplejpeg at the smallest M/8 scale
keeping both sides >= 256, Pillow for anything else), take the centre square resized to 256 px
with HAMMING, encode it at q95 and append jpg/txt/json members to one tar. No validation, no
parquet, no manifest, no hashing: what a hand-written script would do. Only PIL, simplejpeg and
the standard library are imported, so its CPU is the loop's, plus one small interpreter start.
malloc gets shard's setting (glibc's mmap threshold fixed at 4 MiB, ``mmpipe.io``): with glibc's
defaults the loop spent ~1.9 CPU s of ~10 in the kernel, trimming and faulting the heap in again
per photo, and shard would beat its "limit" by its allocator alone.
"""

from __future__ import annotations

import csv
import ctypes
import io
import json
import sys
import tarfile
from pathlib import Path

import simplejpeg
from PIL import Image

SIZE, QUALITY = 256, 95


def picture(data: bytes) -> Image.Image:
    try:
        pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=SIZE, min_width=SIZE)
        img = Image.fromarray(pixels)
    except ValueError:  # not a JPEG simplejpeg takes: Pillow, reduced by draft where it can
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (SIZE, SIZE))
        img = img.convert("RGB")
    # mmpipe.shard.square_resize, written out: this loop imports nothing of mmpipe
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    method = Image.Resampling.HAMMING if side > SIZE else Image.Resampling.BICUBIC
    return img.resize((SIZE, SIZE), method, box=box)


def main(src: Path, out: Path) -> int:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD, as shard's
        libc.mallopt(-1, 8 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: its allocator as it is
    with (src / "captions.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    with tarfile.open(out, "w") as tar:
        for i, row in enumerate(rows):
            buf = io.BytesIO()
            picture((src / row["image"]).read_bytes()).save(buf, format="JPEG", quality=QUALITY)
            meta = json.dumps({"image": row["image"], "label": row.get("label")}).encode()
            for ext, payload in (
                ("jpg", buf.getvalue()),
                ("txt", row["caption"].encode()),
                ("json", meta),
            ):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return len(rows)


if __name__ == "__main__":
    print(main(Path(sys.argv[1]), Path(sys.argv[2])))
