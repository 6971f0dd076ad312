"""Incremental data stages: shard reuses the previous output's shards whose samples are all
unchanged; ingest reuses earlier image checks by content (``CheckCache``, at the end).

A sample (one image with all its captions) has bytes that are a pure function of its image's
rows in pairs.parquet (captions, labels, split, meta, the image's content id), the image and the
shard params; so a shard of the previous output can be reused as it is when the params hash is
the same, every pair it holds is still in pairs.parquet with the same row, and none of its images
gained a pair. Every shard run writes ``members.parquet`` (one row per caption of each sample:
key, pair_id, the digest of its pair's row, shard) so that the next run can decide that without
opening a tar. Everything else (new images, images with a new, changed or deleted pair, and the
other samples of a shard that held one: that shard is retired) is encoded again into new shards
numbered after the reused ones. The set of samples is then the from-scratch run's, byte for byte per sample;
only shard boundaries differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mmpipe.errors import InputError
from mmpipe.layout import SPLITS
from mmpipe.manifest import ShardEntry, SplitEntry, read_manifest

MEMBERS = "members.parquet"
MEMBERS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("pair_id", pa.string()),
        ("digest", pa.string()),
        ("shard", pa.string()),
    ]
)


def pair_digest(row: dict[str, Any]) -> str:
    """sha256 of a pairs.parquet row (every column): what its samples' bytes depend on."""
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode()).hexdigest()[:32]


def pair_digests(pairs: pq.ParquetFile) -> tuple[dict[str, tuple[str, str]], dict[str, int]]:
    """pair_id -> (digest of its row, image_id), and image_id -> its number of pairs, streamed
    over pairs.parquet (an incremental run only)."""
    from mmpipe.align import PAIR_COLUMNS
    from mmpipe.io import iter_batches

    # the columns shard's _jobs digests (audio_path when the collection has audio)
    columns = [*PAIR_COLUMNS, *[c for c in ("audio_path",) if c in pairs.schema_arrow.names]]
    out: dict[str, tuple[str, str]] = {}
    per_image: dict[str, int] = defaultdict(int)
    for batch in iter_batches(pairs, 4096, columns):
        for row in batch.to_pylist():
            out[row["pair_id"]] = (pair_digest(row), row["image_id"])
            per_image[row["image_id"]] += 1
    return out, per_image


@dataclass
class Reuse:
    """What the previous output gives this run: reusable shard entries per split, the samples
    they hold, and the images needing no encoding at all (with their number of pairs)."""

    shards: dict[str, list[ShardEntry]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    done_images: set[str] = field(default_factory=set)
    done_pair_count: int = 0
    members: list[dict[str, str]] = field(default_factory=list)  # rows of the reused shards

    @property
    def n_shards(self) -> int:
        return sum(len(v) for v in self.shards.values())


def plan_reuse(
    previous: Path | None, params_hash: str, pairs: pq.ParquetFile, copies: int
) -> Reuse:
    """The shards of ``previous`` (a committed shard output) that this run can keep as they are.

    Nothing is reused when there is no previous output, it has no members index, or it was
    written with other params.
    """
    reuse = Reuse()
    if previous is None or not (previous / MEMBERS).is_file():
        return reuse
    try:
        manifest = read_manifest(previous)
    except (InputError, OSError):
        return reuse
    if manifest.params_hash != params_hash:
        return reuse
    digests, per_image = pair_digests(pairs)
    members: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in pq.read_table(previous / MEMBERS).to_pylist():
        members[row["shard"]].append(row)
    held: dict[str, int] = defaultdict(int)  # image_id -> its samples in reused shards
    expected: dict[str, int] = {}
    # in the order a from-scratch run writes (SPLITS, then shard names): reusing everything
    # gives the very same members.parquet, so the stage output's hash does not change
    for split in SPLITS:
        entry = manifest.splits.get(split, SplitEntry())
        for shard in sorted(entry.shards, key=lambda e: e.name):
            rows = members.get(shard.name, [])
            ok = len(rows) == (shard.pairs or 0) and (previous / shard.name).is_file()
            if ok and _unchanged(rows, digests, per_image):
                reuse.shards.setdefault(split, []).append(shard)
                reuse.keys.update(r["key"] for r in rows)
                reuse.members.extend(rows)
                image_of = {r["key"]: digests[r["pair_id"]][1] for r in rows}  # per sample
                for image_id in image_of.values():
                    held[image_id] += 1
                    expected[image_id] = 1 + copies if split == "train" else 1
    reuse.done_images = {image for image, n in held.items() if n == expected[image]}
    reuse.done_pair_count = sum(per_image[image] for image in reuse.done_images)
    return reuse


def _unchanged(
    rows: list[dict[str, str]],
    digests: dict[str, tuple[str, str]],
    per_image: dict[str, int],
) -> bool:
    """Whether every sample of a shard (its members rows) is what this run would write: each of
    its pairs has the same row, and each of its images has no other pair now."""
    held: dict[str, int] = defaultdict(int)  # sample key -> its pairs
    image_of: dict[str, str] = {}
    for r in rows:
        now = digests.get(r["pair_id"])
        if now is None or now[0] != r["digest"]:
            return False
        held[r["key"]] += 1
        image_of[r["key"]] = now[1]
    return all(per_image[image_of[key]] == n for key, n in held.items())


def link_shards(reuse: Reuse, previous: Path, out_dir: Path) -> None:
    """Hard-link (copy across filesystems) the reused tars into the staging directory."""
    for shards in reuse.shards.values():
        for shard in shards:
            src, dst = previous / shard.name, out_dir / shard.name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)


def next_index(reuse: Reuse, split: str) -> int:
    """The first shard number of this run's new shards of ``split``."""
    numbers = [int(s.name.rsplit("-", 1)[1].split(".")[0]) for s in reuse.shards.get(split, [])]
    return max(numbers, default=-1) + 1


class MembersWriter:
    """members.parquet, streamed: the reused shards' rows first, then each new sample's (a row
    per caption of the sample)."""

    def __init__(self, out_dir: Path, reused: list[dict[str, str]]) -> None:
        self.writer = pq.ParquetWriter(out_dir / MEMBERS, MEMBERS_SCHEMA)
        self.rows: list[dict[str, str]] = []
        self.new = 0
        for row in reused:
            self._append(row)

    def add(self, sample: dict[str, Any], shard: str) -> None:
        """Record one written sample (its ``__pairs__``' digests come from shard's _images)."""
        for pair_id, digest in sample["__pairs__"]:
            self._append(
                {"key": sample["__key__"], "pair_id": pair_id, "digest": digest, "shard": shard}
            )
        self.new += 1

    def _append(self, row: dict[str, str]) -> None:
        self.rows.append(row)
        if len(self.rows) >= 4096:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=MEMBERS_SCHEMA))
            self.rows = []

    def close(self) -> None:
        """Write the rest and the footer."""
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        """After an error (the staging directory goes with the file)."""
        with contextlib.suppress(Exception):
            self.writer.close()


# ----------------------------------------------------------------------------- ingest's checks

CHECKS = "ingest-checks.parquet"
CHECK_FIELDS = ("reason", "detail", "width", "height", "format")


class CheckCache:
    """Outcomes of ingest's image checks by content: an incremental night decodes only new images.

    A check's outcome (reason, detail, width, height, format) is a pure function of the file's
    bytes and the check's settings, so it is keyed by the sha256 ingest computes anyway (for
    duplicates) within one ``settings`` digest (the limits, Pillow's version, the code of the
    check: ``check_settings``); a cache written under other settings is ignored whole. Paths
    play no part: a file renamed, copied or re-downloaded (new mtime) is still a hit; a file
    changed in place is a miss. Nothing here can change an output, only skip a decode.

    Workers load the keys only (``keys_only``: 16 bytes per image) to tell a hit; the process
    writing the results fills a hit's outcome in from the full table (``outcome``).
    """

    def __init__(self, table: pa.Table | None = None) -> None:
        from mmpipe.keys import KeyIndex, arrow_keys

        self.table = table
        self.index = KeyIndex.build(arrow_keys(table.column("sha256")) if table else _no_keys())

    @classmethod
    def load(cls, path: str | Path | None, settings: str, keys_only: bool = False) -> CheckCache:
        """The cache at ``path`` if written under ``settings``; else an empty one."""
        if path is None or not Path(path).is_file():
            return cls()
        try:
            pf = pq.ParquetFile(path)
            meta = pf.schema_arrow.metadata or {}
            if meta.get(b"settings") != settings.encode():
                return cls()
            return cls(pf.read(columns=["sha256"] if keys_only else None))
        except (OSError, pa.ArrowException):  # unreadable: a cold night, never an error
            return cls()

    def __len__(self) -> int:
        return len(self.index)

    def _row(self, sha256: str) -> int:
        from mmpipe.keys import string_keys

        return int(self.index.find(string_keys([sha256]))[0])

    def has(self, sha256: str) -> bool:
        """Whether the image with this content was checked under the same settings."""
        return len(self.index) > 0 and self._row(sha256) >= 0

    def outcome(self, sha256: str) -> dict[str, Any]:
        """The check's fields (``CHECK_FIELDS``) for a content ``has`` found."""
        assert self.table is not None
        row = self.table.slice(self._row(sha256), 1).to_pylist()[0]
        return {k: row[k] for k in CHECK_FIELDS}


def _no_keys() -> Any:
    import numpy as np

    return np.zeros((0, 2), dtype=np.uint64)


def check_settings(**settings: Any) -> str:
    """Digest of what an image check's outcome depends on besides the bytes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def write_check_cache(results: Path, dest: Path, settings: str) -> int:
    """The content-checked rows of ingest's results work file as the next night's cache
    (streamed; replaced atomically); returns its rows. Rows without a sha256 (missing, empty,
    unreadable, path or extension rejects) depend on the path, not the content: not cached."""
    import pyarrow.compute as pc

    from mmpipe.io import atomic_path, iter_batches

    pf = pq.ParquetFile(results)
    fields = ["sha256", *CHECK_FIELDS]
    schema = pa.schema([pf.schema_arrow.field(f) for f in fields], metadata={"settings": settings})
    n = 0
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in iter_batches(pf, 8192, fields):
            kept = batch.filter(pc.is_valid(batch.column("sha256")))
            writer.write_batch(kept)
            n += kept.num_rows
    return n
