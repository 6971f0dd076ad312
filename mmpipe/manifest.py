"""The shard manifest (``manifest.json``): what shard writes and every reader of shards reads.

One typed ``Manifest`` instead of a dict: readers use attributes, and the compatibility with
manifests written before a field existed lives here only, as that field's default (``labels``
"unknown", ``decode`` "reduced", no ``labelled_pairs_per_split``: see ``Manifest.labelled``).

The file is a DVC output, so its bytes are part of the data version (its sha256 names a
published shard set and is what every model records as its data): ``write_manifest`` writes
the fields that were set, and only those, as key-sorted indented JSON, so a manifest read and
written again is byte-identical. ``version`` is the format version: files of version 1 (all
written so far) do not carry it; a later format writes it, and this code refuses a version it
does not know.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mmpipe.errors import InputError
from mmpipe.io import sha256_file, write_json_atomic
from mmpipe.storage import MANIFEST, is_url, join, redact, resolve_shard_bytes

__all__ = ["MANIFEST", "VERSION", "Manifest", "read_manifest", "write_manifest"]

VERSION = 1  # the newest format this code reads and writes


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Entry):
    """One tar: its file name, samples, the caption rows they hold (``pairs``: the samples
    of one image hold all its captions; None: shards of one sample per pair, written before),
    and the size and sha256 it was written with."""

    name: str
    count: int
    pairs: int | None = None
    bytes: int | None = None  # None: nothing to verify the file against (readers refuse it)
    sha256: str | None = None


class SplitEntry(_Entry):
    """A split's samples (images, with train's augmented copies), the caption rows they hold
    (``pairs``; None: one sample per pair, written before) and its shards, in name order."""

    count: int = 0
    pairs: int | None = None
    shards: list[ShardEntry] = []


class AudioEntry(_Entry):
    """The audio modality: the member format and the pairs with a clip per split."""

    member: str = "flac"
    sample_rate: int
    pairs_with_audio_per_split: dict[str, int] = {}


class Manifest(_Entry):
    """``manifest.json``. ``labels``: whether labels exist ("none": train contrastive only,
    "partial", "all"; "unknown": a manifest older than the label counts), with the labelled
    pairs per split (label_index -1 marks an unlabelled sample). A multi-label
    (``label_separator``) has its classes in the sample's ``label_indices``; a label outside
    the classes (``<unk>`` under align.top_k_labels) has none and is counted per split.
    ``rejected_pairs_per_split`` (ingest.image_check: header only): pairs left out, so that
    pairs in = pairs sharded + pairs rejected. ``audio``: only when the pairs carry clips."""

    version: int = VERSION
    params_hash: str | None = None
    image_size: int | None = None
    decode: Literal["reduced", "full"] = "reduced"  # predict preprocesses as the shards were
    classes: list[str] = []
    labels: Literal["none", "partial", "all", "unknown"] = "unknown"
    labelled_pairs_per_split: dict[str, int] | None = None
    label_separator: str | None = None
    multi_label_pairs: int = 0
    unknown_label_pairs_per_split: dict[str, int] = {}
    splits: dict[str, SplitEntry]
    align_report_pairs_per_split: dict[str, int] = {}
    rejected_pairs_per_split: dict[str, int] | None = None
    audio: AudioEntry | None = None

    def count(self, split: str) -> int:
        """Samples in ``split`` (0 when the manifest has no such split)."""
        entry = self.splits.get(split)
        return entry.count if entry is not None else 0

    def pairs(self, split: str) -> int:
        """Caption rows in ``split``: every caption of every sample (the samples' count in
        shards of one sample per pair)."""
        entry = self.splits.get(split)
        if entry is None:
            return 0
        return entry.pairs if entry.pairs is not None else entry.count

    def labelled(self, split: str) -> bool:
        """Whether ``split`` has labelled pairs. Manifests written before the label counts are
        taken as labelled when they list classes."""
        if self.labelled_pairs_per_split is None:
            return bool(self.classes)
        return self.labelled_pairs_per_split.get(split, 0) > 0

    def to_json(self) -> dict[str, Any]:
        """The file's JSON object: the fields that were set (read from a file or given)."""
        return self.model_dump(mode="json", exclude_unset=True)


def parse_manifest(data: Any, where: str) -> Manifest:
    """A manifest from its JSON object; InputError naming ``where`` if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("splits"), dict):
        raise InputError(f"{where}: no 'splits' mapping; run `mmpipe shard` again")
    version = data.get("version", VERSION)
    if not isinstance(version, int) or version > VERSION:
        raise InputError(
            f"{where}: manifest version {version!r}, this mmpipe reads up to {VERSION}; "
            "update mmpipe or run `mmpipe shard` again"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise InputError(f"{where}: {field}: {first['msg']}; run `mmpipe shard` again") from None


def resolve_manifest(shard_dir: str | Path) -> tuple[str, Manifest]:
    """Where the shards are (a published set's version URL, or the local directory) and their
    manifest. Every problem is an InputError that names the file and says how to produce it."""
    if is_url(shard_dir):
        version_url, raw = resolve_shard_bytes(str(shard_dir))
        where = join(redact(version_url), MANIFEST)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{where}: not valid JSON ({exc}); publish the shards again") from None
        return version_url, parse_manifest(data, where)
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{path}: shard manifest not found; run `mmpipe shard` first")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); run `mmpipe shard` again") from None
    return str(shard_dir), parse_manifest(data, str(path))


def read_manifest(shard_dir: str | Path, require: str | None = None) -> Manifest:
    """The shards' manifest (local, or a published set's URL: ``storage.resolve_shard_bytes``);
    with ``require``, that split must hold samples."""
    where, manifest = resolve_manifest(shard_dir)
    if require is not None and not manifest.count(require):
        raise InputError(
            f"{redact(join(where, MANIFEST))}: the {require} split is empty (too little data "
            "for align's ratios?)"
        )
    return manifest


def write_manifest(manifest: Manifest, out_dir: Path) -> None:
    """``out_dir/manifest.json``, atomically, as key-sorted indented JSON (stable bytes)."""
    write_json_atomic(Path(out_dir) / MANIFEST, manifest.to_json())


def manifest_sha256(shard_dir: str | Path) -> str:
    """sha256 of the shards' manifest.json (the data version), local or published."""
    if is_url(shard_dir):
        return hashlib.sha256(resolve_shard_bytes(str(shard_dir))[1]).hexdigest()
    return sha256_file(Path(shard_dir) / MANIFEST)


def shard_location(shard_dir: str | Path) -> str | Path:
    """A local shard directory as a Path; a URL kept a string (a Path would fold its ``//``)."""
    return str(shard_dir) if is_url(shard_dir) else Path(shard_dir)
