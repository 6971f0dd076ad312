"""Read the WebDataset shards: the training/eval loader, raw iteration, the manifest.

The loader is one flat, named list of pipeline stages (after open_clip's ``get_wds_dataset``).
Each DataLoader worker runs::

    shards (manifest order, shuffled by seed+epoch) -> split_by_worker -> tar samples
    -> rank filter (round-robin by global sample index) -> sample shuffle -> decode (+augment)
    -> chunks of decoded samples

and the main process re-batches the chunks, so every rank sees exactly
``count // world_size`` samples and the same number of batches whatever the shard sizes and
``num_workers`` (uneven shards under DDP hang training: webdataset#188). The price: every rank
reads every shard's bytes (it decodes only its own samples), fine for local disks; for remote
shards at scale, switch to whole-shard splitting with even shard sizes.
"""

from __future__ import annotations

import io
import json
import logging
import random
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from mmpipe.augment import apply_augment, create_augment, derive_seed
from mmpipe.checkpoint import MANIFEST, read_manifest
from mmpipe.config import TransformSpec
from mmpipe.errors import InputError
from mmpipe.parallel import pool_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard of a split: its path, the global index of its first sample, its sample count."""

    url: str
    offset: int
    count: int


def split_shards(
    shard_dir: str | Path, split: str, manifest: dict[str, Any] | None = None
) -> list[ShardRef]:
    """The split's shards in manifest order, each checked to exist."""
    manifest = manifest or read_manifest(shard_dir)
    entry = manifest["splits"].get(split)
    if entry is None:
        known = ", ".join(sorted(manifest["splits"])) or "none"
        raise InputError(f"{Path(shard_dir) / MANIFEST}: no split {split!r} (has: {known})")
    refs, offset = [], 0
    for shard in entry.get("shards", []):
        path = Path(shard_dir) / shard["name"]
        if not path.is_file():
            raise InputError(
                f"{path}: listed in manifest.json but missing; run `mmpipe shard` again"
            )
        refs.append(ShardRef(str(path), offset, int(shard["count"])))
        offset += int(shard["count"])
    return refs


# ----------------------------------------------------------------------------- decoding


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.array(img.convert("RGB"), dtype=np.uint8)  # writable copy for torch


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1], then normalised (x - 0.5) / 0.5."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    return (x - 0.5) / 0.5


def decode_image(data: bytes) -> torch.Tensor:
    """Stored JPEG bytes -> the model's input tensor (3, H, W), exactly as the loader builds it."""
    return to_tensor(decode_rgb(data))


# ----------------------------------------------------------------------------- worker stages


class SkipCounter:
    """webdataset exception handler: log and count each skipped item (never drop silently)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, exn: Exception) -> bool:
        self.n += 1
        log.warning("skipping unreadable shard data: %s", exn)
        return True  # continue with the next item


class ShardSource:
    """Stage 0: the split's shards as ``{"url"}`` dicts, shuffled by (seed, epoch) if asked."""

    def __init__(self, shards: Sequence[ShardRef], shuffle: bool, seed: int, epoch: int) -> None:
        self.urls, self.shuffle, self.seed, self.epoch = (
            [s.url for s in shards],
            shuffle,
            seed,
            epoch,
        )

    def __call__(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle:
            # same order on every rank and worker; split_by_worker then deals them out
            random.Random(derive_seed("shards", self.seed, self.epoch)).shuffle(urls)
        for url in urls:
            yield {"url": url}


class RankFilter:
    """Keep this rank's samples: global index g (rotated per epoch) with g % world_size == rank.

    Samples past ``(total // world_size) * world_size`` are dropped so every rank gets the same
    count; with shuffling the rotation changes per epoch, so a different tail is dropped each time.
    """

    def __init__(self, shards: Sequence[ShardRef], rank: int, world_size: int, rotate: int) -> None:
        self.offsets = {s.url: s.offset for s in shards}
        self.total = sum(s.count for s in shards)
        self.rank, self.world_size, self.rotate = rank, world_size, rotate
        self.usable = (self.total // world_size) * world_size

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        seen: dict[str, int] = {}
        for sample in src:
            url = sample["__url__"]
            index = seen.get(url, 0)
            seen[url] = index + 1
            if self.world_size == 1:
                yield sample
                continue
            g = (self.offsets[url] + index + self.rotate) % max(self.total, 1)
            if g < self.usable and g % self.world_size == self.rank:
                yield sample


class SampleShuffle:
    """Buffer shuffle seeded by (seed, epoch, rank, worker): reproducible for a fixed layout."""

    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int) -> None:
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = random.Random(derive_seed("samples", self.seed, self.epoch, self.rank, worker))
        buf: list[dict[str, Any]] = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = rng.randrange(len(buf))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


class DecodeSample:
    """Raw tar sample -> {image (3, H, W), text, label, key, image_id, caption_id, meta}."""

    def __init__(
        self, augment: Sequence[TransformSpec], seed: int, epoch: int, skips: SkipCounter
    ) -> None:
        self.specs = [TransformSpec.model_validate(s) for s in augment]
        self.seed, self.epoch, self.skips = seed, epoch, skips
        create_augment(self.specs)  # fail fast in the caller's process on a bad spec

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        compose = create_augment(self.specs)  # built in the worker: nothing to pickle
        for sample in src:
            try:
                yield self.decode(sample, compose)
            except Exception as exn:  # any broken sample: count it, say which, go on
                self.skips(
                    ValueError(f"{sample.get('__key__')} in {sample.get('__url__')}: {exn!r}")
                )

    def decode(self, sample: dict[str, Any], compose: Any) -> dict[str, Any]:
        """Decode one sample; online augmentation is seeded by (seed, epoch, key)."""
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        image = decode_rgb(sample["jpg"])
        if compose is not None:
            image = apply_augment(compose, image, derive_seed("online", self.seed, self.epoch, key))
        label = int(meta.get("label_index", -1))
        return {
            "image": to_tensor(image),
            "text": sample["txt"].decode("utf-8"),
            "label": label,
            # every class of a multi-label; shards without label_indices: the one label, if any
            "labels": list(meta.get("label_indices") or ([label] if label >= 0 else [])),
            "value": label_value(meta.get("label")),
            "label_text": meta.get("label"),
            "key": key,
            "image_id": meta.get("image_id"),
            "caption_id": meta.get("caption_id"),
            "meta": meta.get("meta") or {},
        }


class Chunk:
    """Group decoded samples into chunks (one IPC transfer each) carrying the skip-count delta."""

    def __init__(self, size: int, skips: SkipCounter) -> None:
        self.size, self.skips = size, skips

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        reported = self.skips.n
        rows: list[dict[str, Any]] = []
        for sample in src:
            rows.append(sample)
            if len(rows) == self.size:
                yield self.pack(rows, self.skips.n - reported)
                reported, rows = self.skips.n, []
        if rows or self.skips.n > reported:
            yield self.pack(rows, self.skips.n - reported)

    @staticmethod
    def pack(rows: list[dict[str, Any]], skipped: int) -> dict[str, Any]:
        """Stack the images once so the chunk crosses the process boundary as one tensor."""
        images = torch.stack([r.pop("image") for r in rows]) if rows else torch.empty(0)
        return {"image": images, "rows": rows, "skipped": skipped}


# ----------------------------------------------------------------------------- main-process stages


def label_value(label: Any) -> float:
    """A label as a number (regression targets); nan when there is none or it is not numeric."""
    try:
        return float(label)
    except (TypeError, ValueError):
        return float("nan")


def pad_labels(label_sets: list[list[int]]) -> torch.Tensor:
    """Class-index lists as (B, L) long, padded with -1 (L >= 1)."""
    width = max([1, *(len(s) for s in label_sets)])
    out = torch.full((len(label_sets), width), -1, dtype=torch.long)
    for i, s in enumerate(label_sets):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(rows: list[dict[str, Any]], images: list[torch.Tensor]) -> dict[str, Any]:
    """A batch: image (B, 3, H, W), label (B,) (-1 = none), labels (B, L) (the classes of a
    multi-label, -1 padded), value (B,) (numeric label, nan = none), lists for the rest."""
    return {
        "image": torch.stack(images),  # (B, 3, H, W)
        "text": [r["text"] for r in rows],
        "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),  # (B,)
        "labels": pad_labels([r["labels"] for r in rows]),  # (B, L)
        "value": torch.tensor([r["value"] for r in rows], dtype=torch.float32),  # (B,)
        "label_text": [r["label_text"] for r in rows],
        "key": [r["key"] for r in rows],
        "image_id": [r["image_id"] for r in rows],
        "caption_id": [r["caption_id"] for r in rows],
        "meta": [r["meta"] for r in rows],
    }


class Rebatch:
    """Chunks from all workers -> batches of exactly ``batch_size`` (last one partial unless drop).

    Also applies ``limit`` (samples per rank), ``skip_batches`` (resume inside an epoch) and
    keeps ``stats``: samples read, items skipped by handlers, samples expected for this rank.
    """

    def __init__(
        self, batch_size: int, drop_last: bool, skip_batches: int, limit: int | None, expected: int
    ) -> None:
        self.batch_size, self.drop_last, self.skip_batches = batch_size, drop_last, skip_batches
        self.limit, self.expected = limit, expected
        self.stats = {"samples": 0, "skipped": 0, "expected": expected}

    def __call__(self, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.stats.update(samples=0, skipped=0)
        to_skip = self.skip_batches * self.batch_size
        rows: list[dict[str, Any]] = []
        images: list[torch.Tensor] = []
        for chunk in chunks:
            self.stats["skipped"] += chunk["skipped"]
            if self.limit is not None and self.stats["samples"] >= self.limit:
                break
            for i, row in enumerate(chunk["rows"][: self.room()]):
                self.stats["samples"] += 1
                if to_skip > 0:  # a resumed epoch: drop what was consumed before
                    to_skip -= 1
                    continue
                rows.append(row)
                images.append(chunk["image"][i])
                if len(rows) == self.batch_size:
                    yield collate(rows, images)
                    rows, images = [], []
        if rows and not self.drop_last:
            yield collate(rows, images)
        self.check()

    def room(self) -> int | None:
        """How many more samples the limit allows (None = no limit)."""
        return None if self.limit is None else self.limit - self.stats["samples"]

    def check(self) -> None:
        """Say loudly when the epoch did not see every sample the manifest promises."""
        s = self.stats
        if s["skipped"] or (self.limit is None and s["samples"] != s["expected"]):
            log.warning(
                "loader read %d of %d expected samples; %d unreadable items skipped",
                s["samples"],
                s["expected"],
                s["skipped"],
            )


def _identity(x: Any) -> Any:
    """DataLoader collate_fn: chunks are already collated by the workers."""
    return x


def create_dataloader(
    shard_dir: str | Path,
    split: str,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    num_workers: int = 0,
    augment: Sequence[TransformSpec] = (),
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    limit: int | None = None,
    skip_batches: int = 0,
) -> wds.WebLoader:
    """Batches of one split for one epoch (see the module docstring); ``.stats`` counts samples.

    ``shuffle_buffer > 0`` shuffles shard order and samples, seeded by (seed, epoch). With
    ``world_size > 1`` each rank gets ``count // world_size`` samples, disjoint across ranks.
    ``skip_batches`` resumes an epoch: the same call without it yields those batches first.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise InputError(
            f"loader: need batch_size >= 1 and 0 <= rank < world_size, "
            f"got {batch_size}, {rank}, {world_size}"
        )
    shards = split_shards(shard_dir, split)
    total = sum(s.count for s in shards)
    shuffle = shuffle_buffer > 0
    rotate = derive_seed("rotate", seed, epoch) % max(total, 1) if shuffle else 0
    skips = SkipCounter()
    dataset = wds.DataPipeline(
        ShardSource(shards, shuffle, seed, epoch),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=skips),
        RankFilter(shards, rank, world_size, rotate),
        SampleShuffle(shuffle_buffer, seed, epoch, rank) if shuffle else None,
        DecodeSample(list(augment), seed, epoch, skips),
        Chunk(max(1, min(batch_size, 256)), skips),
    )
    expected = total // world_size if world_size > 1 else total
    rebatch = Rebatch(batch_size, drop_last, skip_batches, limit, expected)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        persistent_workers=False,
        worker_init_fn=_init_loader_worker if num_workers else None,
        # never fork the trainer: under Prefect a forked worker ran Prefect's at-exit hooks and
        # died with exit code 1 at the end of each epoch (see _init_loader_worker)
        multiprocessing_context=pool_context() if num_workers else None,
    ).compose(rebatch)
    loader.stats = rebatch.stats
    return loader


def _init_loader_worker(worker_id: int) -> None:
    """Loader workers start from a forkserver, never a fork of the trainer: the trainer may run
    inside an orchestrator whose state must not leak into them (a forked worker of a Prefect
    task inherited Prefect's at-exit hooks, which fail outside the parent: "DataLoader worker
    exited unexpectedly with exit code 1"). Default SIGTERM, so the DataLoader's shutdown of a
    slow worker ends it quietly; Ctrl-C goes to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- raw access


def iterate_split(shard_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Every stored sample of a split in manifest order.

    Yields {__key__, __url__, jpg (bytes), txt (str), json (dict)}.
    """
    for ref in split_shards(shard_dir, split):
        try:
            for sample in wds.tarfile_samples(iter([{"url": ref.url}])):
                yield {
                    "__key__": sample["__key__"],
                    "__url__": ref.url,
                    "jpg": sample["jpg"],
                    "txt": sample["txt"].decode("utf-8"),
                    "json": json.loads(sample["json"]),
                }
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"{ref.url}: unreadable shard ({exc!r}); run `mmpipe shard` again"
            ) from None
