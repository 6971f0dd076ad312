"""Loader samples/s: mmpipe.data.create_dataloader vs raw tar read + decode of the same shards,
and vs a folder-of-files torch Dataset/DataLoader over the same JPEG bytes.

All three produce the same thing: batches of ``batch_size`` float tensors (B, 3, S, S)
normalised like the loader, plus the caption text and label. The shards are written by the
pipeline (synthetic N images, one caption each, shard.copies=0); the folder copy holds exactly
the JPEG bytes stored in the train shards. Interleaved repeats, best of each side kept.
"""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "loader"


def raw_tar_epoch(tars: list[Path], batch_size: int) -> int:
    """The bare loop: tarfile read, group members by key, TurboJPEG decode, tensor, stack per
    batch."""
    import numpy as np
    import torch
    from PIL import Image

    samples, images, texts, labels = 0, [], [], []

    def flush() -> None:
        torch.stack(images)
        torch.tensor(labels)
        images.clear()
        texts.clear()
        labels.clear()

    for path in tars:
        with tarfile.open(path, "r") as tar:
            current: dict[str, bytes] = {}
            key = None
            for member in tar:
                k, ext = member.name.split(".", 1)
                if key is not None and k != key:
                    _emit(current, images, texts, labels, np, torch, Image)
                    samples += 1
                    current = {}
                    if len(images) == batch_size:
                        flush()
                key = k
                current[ext] = tar.extractfile(member).read()
            if current:
                _emit(current, images, texts, labels, np, torch, Image)
                samples += 1
    if images:
        flush()
    return samples


def _emit(sample, images, texts, labels, np, torch, Image) -> None:
    import simplejpeg  # the fastest decode of these JPEGs here: the loader's own (data.decode_rgb)

    arr = simplejpeg.decode_jpeg(sample["jpg"], "RGB")
    x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
    images.append((x - 0.5) / 0.5)
    meta = json.loads(sample["json"])
    pair = (meta.get("pairs") or [meta])[0]  # a sample per image: its first caption
    texts.append(pair.get("caption", sample["txt"].decode("utf-8")))
    labels.append(pair.get("label_index", -1))


class FolderDataset:
    """A plain map-style Dataset over a folder of JPEGs + a labels/captions list."""

    def __init__(self, rows: list[tuple[str, str, int]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, str, int]:
        import numpy as np
        import torch
        from PIL import Image

        path, text, label = self.rows[i]
        with Image.open(path) as img:
            arr = np.array(img.convert("RGB"), dtype=np.uint8)
        x = torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
        return (x - 0.5) / 0.5, text, label


def folder_epoch(rows: list[tuple[str, str, int]], batch_size: int, num_workers: int) -> int:
    from torch.utils.data import DataLoader

    loader = DataLoader(FolderDataset(rows), batch_size=batch_size, num_workers=num_workers)
    return sum(len(b[2]) for b in loader)


def loader_epoch(shard_dir: Path, batch_size: int, num_workers: int, shuffle: int) -> int:
    """A training epoch's read: a row per image sample (``captions="one"``), as the bare
    loops read a row per sample."""
    from mmpipe.data import create_dataloader

    loader = create_dataloader(
        shard_dir, "train", batch_size, shuffle_buffer=shuffle, num_workers=num_workers,
        captions="one",
    )  # fmt: skip
    return sum(len(b["label"]) for b in loader)


def verify_pass(shard_dir: Path) -> int:
    """The loader's shard check from cold: size + sha256 of every train shard vs the manifest
    (done once per process; later epochs hit its cache)."""
    from mmpipe import data

    data._verified.clear()
    return sum(ref.count for ref in data.split_shards(shard_dir, "train"))


def export_folder(shard_dir: Path, dest: Path) -> list[tuple[str, str, int]]:
    """Write the train split's stored JPEGs as files (same bytes); rows for FolderDataset."""
    from mmpipe.data import iterate_split

    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in iterate_split(shard_dir, "train"):
        f = dest / f"{sample['__key__']}.jpg"
        f.write_bytes(sample["jpg"])
        rows.append((str(f), sample["txt"], sample["json"].get("label_index", -1)))
    return sorted(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    n = c.pick(args, 80, 2500, 5000)
    stored = 64  # params.yaml default shard.image_size
    batch = 128
    repeats = c.pick(args, 1, 2, 3)

    import torch

    from mmpipe.manifest import read_manifest
    from mmpipe.shard import run_shard

    with c.workdir(args, NAME) as work:
        src = c.synthetic_source(work / "source", n, 96)
        ingest_dir, align_dir, _ = c.ingest_align(src, work, workers=2)
        shard_dir = work / "shards"
        run_shard(
            align_dir, ingest_dir, c.shard_params(stored, workers=2, maxcount=1000), shard_dir
        )
        manifest = read_manifest(shard_dir)
        tars = [shard_dir / s.name for s in manifest.splits["train"].shards]
        train_count = manifest.count("train")
        rows = export_folder(shard_dir, work / "folder")
        fns = {
            "raw_tar": lambda: raw_tar_epoch(tars, batch),
            "loader_w0": lambda: loader_epoch(shard_dir, batch, 0, 0),
            "folder_w0": lambda: folder_epoch(rows, batch, 0),
            "loader_w1": lambda: loader_epoch(shard_dir, batch, 1, 0),
            "folder_w1": lambda: folder_epoch(rows, batch, 1),
            "loader_w0_shuffle1000": lambda: loader_epoch(shard_dir, batch, 0, 1000),
            "verify": lambda: verify_pass(shard_dir),
        }
        best, all_times, results = c.interleaved(fns, repeats)

    counts = {k: int(v) for k, v in results.items()}
    assert len(set(counts.values())) == 1 and counts["raw_tar"] == train_count, counts
    rate = {k: train_count / v for k, v in best.items()}
    r_raw = rate["loader_w0"] / rate["raw_tar"]
    r_folder = rate["loader_w0"] / rate["folder_w0"]
    r_folder1 = rate["loader_w1"] / rate["folder_w1"]
    r_verify = best["verify"] / best["loader_w0"]
    figures = [
        c.figure("raw tar read + decode, main process", rate["raw_tar"], "samples/s"),
        c.figure(
            "create_dataloader, num_workers=0",
            rate["loader_w0"],
            "samples/s",
            ratio=r_raw,
            target="ratio >= 0.9 of raw tar",
            met=r_raw >= 0.9,
        ),
        c.figure(
            "folder Dataset/DataLoader, num_workers=0",
            rate["folder_w0"],
            "samples/s",
            note=f"loader/folder = {r_folder:.2f}",
        ),
        c.figure(
            "create_dataloader, num_workers=1",
            rate["loader_w1"],
            "samples/s",
            ratio=rate["loader_w1"] / rate["raw_tar"],
            note=f"loader/folder = {r_folder1:.2f}",
        ),
        c.figure("folder Dataset/DataLoader, num_workers=1", rate["folder_w1"], "samples/s"),
        c.figure(
            "create_dataloader, shuffle_buffer=1000",
            rate["loader_w0_shuffle1000"],
            "samples/s",
            ratio=rate["loader_w0_shuffle1000"] / rate["raw_tar"],
        ),
        c.figure(
            "shard verification (size + sha256 of every train shard), once per process",
            best["verify"],
            "s",
            ratio=r_verify,
            note="ratio = seconds / one loader epoch (num_workers=0)",
        ),
        c.figure(
            "loader vs folder files (num_workers=0)",
            r_folder,
            "x",
            ratio=r_folder,
            note=">1 = shards faster than one file per sample",
        ),
    ]
    conditions = {
        "n_images": n,
        "train_samples": train_count,
        "stored_size": stored,
        "batch_size": batch,
        "source_size": 96,
        "shards_train": len(tars),
        "maxcount": 1000,
        "repeats_interleaved": repeats,
        "torch_threads": torch.get_num_threads(),
    }
    data = {
        "best_seconds": {k: round(v, 4) for k, v in best.items()},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in all_times.items()},
        "samples_per_second": {k: round(v, 1) for k, v in rate.items()},
        "counts": counts,
        "ratios": {
            "loader_vs_raw": round(r_raw, 4),
            "loader_vs_folder": round(r_folder, 4),
            "loader_w1_vs_folder_w1": round(r_folder1, 4),
            "verify_vs_loader_epoch": round(r_verify, 4),
        },
    }
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
