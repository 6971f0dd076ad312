"""Read the WebDataset shards: the training/eval loader, raw iteration.

The loader is one flat, named list of pipeline stages (after open_clip's ``get_wds_dataset``).
Each DataLoader worker runs::

    shards (manifest order, shuffled by seed+epoch) -> split_by_worker -> tar samples
    -> rank filter (round-robin by global sample index) -> sample shuffle -> decode (+augment)
    into caption rows (``captions``: one per image sample, or all) -> chunks of rows

and the main process re-batches the chunks, so every rank sees exactly
``count // world_size`` samples and the same number of batches whatever the shard sizes and
``num_workers`` (uneven shards under DDP hang training: webdataset#188). The price: every rank
reads every shard's bytes (it decodes only its own samples), fine for local disks; for remote
shards at scale, switch to whole-shard splitting with even shard sizes.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import re
import signal
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from webdataset.gopen import gopen

from mmpipe.audio import clip_features
from mmpipe.augment import apply_augment, create_augment, derive_seed
from mmpipe.config import TransformSpec
from mmpipe.errors import InputError
from mmpipe.io import sha256_file
from mmpipe.manifest import MANIFEST, Manifest, ShardEntry, read_manifest, resolve_manifest
from mmpipe.parallel import pool_context
from mmpipe.storage import is_url, join, redact, register_webdataset_schemes
from mmpipe.storage import size as storage_size

log = logging.getLogger(__name__)
register_webdataset_schemes()  # s3:// etc. through fsspec, in loader workers too


@dataclass(frozen=True)
class ShardRef:
    """One shard of a split: its path, the global index of its first sample, its sample count,
    and its size in bytes as the manifest lists it."""

    url: str
    offset: int
    count: int
    size: int = -1  # -1: not checked


def split_shards(
    shard_dir: str | Path, split: str, manifest: Manifest | None = None
) -> list[ShardRef]:
    """The split's shards in manifest order, each verified against the manifest.

    Verified = the size the manifest lists and its sha256, hashed once per process and file
    version (``verify_shard``); a mismatch is an InputError naming the shard and the entry.

    ``shard_dir`` may be an object-store URL (``storage.publish_shards``): the manifest of the
    version its pointer names, pinned by the pointer's sha256, and each object's size checked
    here and again as it is opened (hashing every remote object would read the set twice; each
    shard's sha256 was checked when it was written).
    """
    if is_url(shard_dir):
        version_url, manifest = resolve_manifest(shard_dir)
        refs = _shard_refs(manifest, split, version_url, remote=True)
        for ref in refs:
            check_shard_size(ref)
        return refs
    manifest = manifest or read_manifest(shard_dir)
    return _shard_refs(manifest, split, str(shard_dir), remote=False)


def _shard_refs(manifest: Manifest, split: str, where: str, remote: bool) -> list[ShardRef]:
    entry = manifest.splits.get(split)
    if entry is None:
        known = ", ".join(sorted(manifest.splits)) or "none"
        raise InputError(f"{redact(join(where, MANIFEST))}: no split {split!r} (has: {known})")
    refs, offset = [], 0
    for shard in entry.shards:
        if remote:
            url = join(where, shard.name)
        else:
            url = str(Path(where) / shard.name)
            verify_shard(Path(url), shard, split)
        size = shard.bytes if shard.bytes is not None else -1  # -1: not checked
        refs.append(ShardRef(url, offset, shard.count, size))
        offset += shard.count
    return refs


def check_shard_size(ref: ShardRef) -> None:
    """The shard at ``ref.url`` (local or object store) has the size its manifest entry lists."""
    got = storage_size(ref.url)
    if ref.size >= 0 and got != ref.size:
        raise InputError(
            f"{redact(ref.url)}: {got} bytes, manifest.json says {ref.size} (replaced or cut "
            "since it was written); write the shards again"
        )


_verified: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) hashed OK


def verify_shard(path: Path, entry: ShardEntry, split: str) -> None:
    """Check one shard against its manifest entry: present, same size, same sha256.

    The hash is computed once per process for each (path, size, mtime) (the loader is rebuilt
    every epoch); its cost next to an epoch's read is in benchmarks (bench_loader).
    """
    where = f"manifest.json's {split} entry {entry.name!r}"
    again = "run `mmpipe shard` again"
    if not path.is_file():
        raise InputError(f"{path}: listed in {where} but missing; {again}")
    want_size, want_sha = entry.bytes, entry.sha256
    if want_size is None or not want_sha:
        raise InputError(f"{path}: {where} has no bytes/sha256 to verify it against; {again}")
    st = path.stat()
    if st.st_size != want_size:
        raise InputError(
            f"{path}: {st.st_size} bytes but {where} says {want_size} (truncated or replaced "
            f"since `mmpipe shard` wrote it); {again}"
        )
    key = (str(path), st.st_size, st.st_mtime_ns, want_sha)
    if key in _verified:
        return
    got = sha256_file(path)
    if got != want_sha:
        raise InputError(
            f"{path}: sha256 {got[:16]}... but {where} says {want_sha[:16]}... (the bytes "
            f"changed since `mmpipe shard` wrote them: corrupted or modified); {again}"
        )
    _verified.add(key)


# ----------------------------------------------------------------------------- decoding


# JPEG colour spaces whose TurboJPEG decode equals Pillow's pixel for pixel (both libjpeg-turbo's
# ISLOW IDCT and fancy upsampling); CMYK/YCCK differ in the conversion to RGB: Pillow decodes them
_TURBO_SPACES = ("YCbCr", "Gray")


def decode_rgb(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> uint8 (H, W, 3).

    A JPEG (every shard sample) is decoded by libjpeg-turbo's TurboJPEG API (simplejpeg): the
    same pixels as Pillow's decoder (tests/unit/test_decode.py) at a third of the CPU of a 64 px
    sample (0.03 vs 0.10 ms), most of Pillow's being its file parsing. Anything else, and a JPEG
    that simplejpeg refuses (strict: corrupt or truncated data), goes to Pillow, whose verdict
    and message are the loader's as before.
    """
    if data[:2] == b"\xff\xd8":
        try:
            if simplejpeg.decode_jpeg_header(data)[2] in _TURBO_SPACES:
                return simplejpeg.decode_jpeg(data, "RGB")
        except ValueError:
            pass
    with Image.open(io.BytesIO(data)) as img:
        # an RGB image as it is: convert("RGB") would only copy it (~10 % of a 64 px decode)
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.array(rgb, dtype=np.uint8)  # writable copy for torch


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [0, 1], then normalised (x - 0.5) / 0.5."""
    return to_tensor_batch(torch.from_numpy(np.ascontiguousarray(image))[None])[0]


def to_tensor_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), contiguous, in [0, 1] then normalised
    (x - 0.5) / 0.5: four tensor ops for the whole batch."""
    x = images.permute(0, 3, 1, 2).contiguous().float()  # one layout copy, on the uint8 bytes
    return x.div_(255.0).sub_(0.5).div_(0.5)  # in place, on the one float copy


def decode_image(data: bytes) -> torch.Tensor:
    """Stored JPEG bytes -> the model's input tensor (3, H, W), exactly as the loader builds it."""
    return to_tensor(decode_rgb(data))


# ----------------------------------------------------------------------------- worker stages


class SkipCounter:
    """webdataset exception handler: log, count and name each skipped item (never drop silently).

    ``items`` holds "key in shard: error" of each skip, in order; ``n`` counts them.
    """

    def __init__(self) -> None:
        self.items: list[str] = []

    @property
    def n(self) -> int:
        """Items skipped so far."""
        return len(self.items)

    def __call__(self, exn: Exception) -> bool:
        # webdataset appends the shard's url to a tar error's args; DecodeSample's errors carry it
        url = getattr(exn, "url", None) or next(
            (a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "?"
        )
        self.items.append(f"{Path(url).name}: {exn}")
        log.warning("skipping unreadable shard data: %s", exn)
        return True  # continue with the next item


class BadSample(ValueError):
    """A sample that would not decode; names its key and shard."""

    def __init__(self, key: str, url: str, error: Exception) -> None:
        super().__init__(f"sample {key} of {url}: {error!r}")
        self.url = url


class ShardSource:
    """Stage 0: the split's shards as ``{"url"}`` dicts, shuffled by (seed, epoch) if asked."""

    def __init__(self, shards: Sequence[ShardRef], shuffle: bool, seed: int, epoch: int) -> None:
        self.urls, self.shuffle, self.seed, self.epoch = (
            [s.url for s in shards],
            shuffle,
            seed,
            epoch,
        )
        self.sizes = {s.url: s.size for s in shards}

    def __call__(self) -> Iterator[dict[str, str]]:
        urls = list(self.urls)
        if self.shuffle:
            # same order on every rank and worker; split_by_worker then deals them out
            random.Random(derive_seed("shards", self.seed, self.epoch)).shuffle(urls)
        for url in urls:
            # the size again as the shard is opened: a file replaced or cut after the sha256
            # pre-pass (split_shards) still fails, naming it
            size, want = storage_size(url), self.sizes.get(url, -1)
            if want >= 0 and size != want:
                raise InputError(f"{url}: {size} bytes, manifest.json says {want}; changed while "
                                 "being read: run `mmpipe shard` again")  # fmt: skip
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


class TarSamples:
    """Stage: ``{"url"}`` dicts -> the shards' samples ``{__key__, __url__, <ext>: bytes}``.

    What webdataset's ``tarfile_to_samples`` yields, in one generator instead of its three
    (url_opener -> tar_file_expander -> group_by_keys, ~12 % of its time in the layers): each
    shard opened with webdataset's ``gopen`` (fsspec URLs through ``register_webdataset_schemes``),
    read as a tar stream, consecutive members grouped by key (the name up to the first dot of its
    basename; extensions lower-cased). Errors reach ``handler`` with the same arguments at the same
    points, so skips are counted and named as before; ``handler=None`` raises them.
    ``tests/unit/test_data_tar.py`` compares it with webdataset's on the same shards.
    """

    def __init__(self, handler: Any = None) -> None:
        self.handler = handler

    def handle(self, exn: Exception) -> bool:
        """True: go on; False: stop (webdataset's handler contract); None: raise."""
        if self.handler is None:
            raise exn
        return bool(self.handler(exn))

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        current: dict[str, Any] | None = None  # the sample being grouped, across shards too
        stop = False  # a handler said stop while grouping: end, yielding the sample in hand
        raised: Exception | None = None
        for source in src:
            url = source["url"]
            try:
                stream = gopen(url)
            except Exception as exn:
                exn.args = (*exn.args, url)
                if self.handle(exn):
                    continue
                break
            try:
                for fname, data in self.members(stream):
                    try:
                        prefix, suffix = _base_plus_ext(fname)
                        if prefix is None:
                            continue
                        suffix = suffix.lower()
                        if current is None or prefix != current["__key__"]:
                            if _valid(current):
                                yield current
                            current = {"__key__": prefix, "__url__": url}
                        if suffix in current:
                            raise ValueError(f"{fname}: duplicate file name in tar file {suffix} "
                                             f"{current.keys()}")  # fmt: skip
                        current[suffix] = data
                    except Exception as exn:
                        exn.args = (*exn.args, None, None)
                        raised = exn  # re-raised by handle: leaves as it is (webdataset's order)
                        if not self.handle(exn):
                            stop = True
                            break
                if stop:
                    break
                if _valid(current):  # a shard's end ends its last sample
                    yield current
                current = None
            except Exception as exn:  # the tar stream itself: cut, not a tar
                if exn is raised:
                    raise
                exn.args = (*exn.args, stream, url)
                if not self.handle(exn):
                    break
            finally:
                stream.close()
        if _valid(current):
            yield current

    def members(self, fileobj: Any) -> Iterator[tuple[str, bytes]]:
        """(name, bytes) of each regular member, metadata members (``__*__``) left out.

        The headers mmpipe's shards have (a plain regular file: type "0", octal size and checksum,
        no ustar prefix) are read straight off the stream: header, data, padding, with tarfile's
        checks (the checksum, a short read is "unexpected end of data") and its ends (an empty,
        short, zero or bad block after a member). Any other first block (compressed, not a tar, a
        pax or GNU header, a directory) hands the stream, from that block on, to ``tarfile``'s
        own reader: the same members, errors and order as reading it all with tarfile (the
        equivalence tests in ``tests/unit/test_data_tar.py``), at ~half its CPU per member."""
        block = _read_exactly(fileobj, tarfile.BLOCKSIZE)
        head = _plain_header(block)
        if head is None:
            yield from self._tarfile_members(_Prepended(block, fileobj), fileobj)
            return
        while head is not None:
            name, size, _ = head
            pad = -size % tarfile.BLOCKSIZE
            if _is_meta(name):  # read past it: tarfile's next() would
                if len(_read_exactly(fileobj, size + pad)) != size + pad:
                    raise tarfile.ReadError("unexpected end of data")
            else:
                cut = False
                try:
                    data = _read_exactly(fileobj, size)
                    if len(data) != size:
                        cut = True
                        raise tarfile.ReadError("unexpected end of data")
                    yield name, data
                except Exception as exn:
                    if exn.args:
                        exn.args = (f"{exn.args[0]} @ {fileobj}", *exn.args[1:])
                    if not self.handle(exn):
                        return
                if cut or len(_read_exactly(fileobj, pad)) != pad:  # tarfile's next() raises
                    raise tarfile.ReadError("unexpected end of data")  # this one unannotated
            block = _read_exactly(fileobj, tarfile.BLOCKSIZE)
            head = _plain_header(block)
        try:  # after a member tarfile ends on an empty, short, all-zero or bad block
            tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
        except tarfile.HeaderError:
            return
        yield from self._tarfile_members(_Prepended(block, fileobj), fileobj)

    def _tarfile_members(self, stream: Any, fileobj: Any) -> Iterator[tuple[str, bytes]]:
        """``members`` through tarfile's stream reader (``fileobj``: the shard, for messages)."""
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_PlainTarInfo) as tar:
            for info in tar:
                fname = info.name
                try:
                    if not info.isreg() or fname is None or _is_meta(fname):
                        continue
                    if info.sparse is None:  # the stream is at its data: what extractfile reads
                        data = tar.fileobj.read(info.size)
                        if len(data) != info.size:
                            raise tarfile.ReadError("unexpected end of data")
                    else:
                        data = tar.extractfile(info).read()
                    yield fname, data
                    tar.members = []  # a stream: keep no list of what was read
                except Exception as exn:
                    if exn.args:
                        exn.args = (f"{exn.args[0]} @ {fileobj}", *exn.args[1:])
                    if not self.handle(exn):
                        break


def _read_exactly(fileobj: Any, n: int) -> bytes:
    """``n`` bytes, fewer only at the stream's end (a raw stream may return less per read)."""
    data = fileobj.read(n)
    if len(data) >= n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = fileobj.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _Prepended:
    """A read-only stream: ``head`` (bytes already read), then the rest of ``rest``."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.rest.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + self.rest.read(n - len(out)) if len(out) < n else out


def _plain_header(
    buf: bytes, encoding: str = tarfile.ENCODING, errors: str = "surrogateescape"
) -> tuple[str, int, int] | None:
    """(name, size, checksum) of a plain regular file's header (see ``_PlainTarInfo``); None
    for any other block (tarfile's own parse decides what that is)."""
    if len(buf) != tarfile.BLOCKSIZE or buf[156] != 0x30 or buf[345] != 0:
        return None
    try:
        size, chksum = _octal(buf[124:136]), _octal(buf[148:156])
    except ValueError:
        return None
    # the unsigned checksum (calc_chksums' first): the 8 checksum bytes count as spaces
    if size < 0 or chksum != sum(buf) - sum(buf[148:156]) + 256:
        return None
    end = buf.find(b"\0", 0, 100)
    return buf[: 100 if end < 0 else end].decode(encoding, errors), size, chksum


class _PlainTarInfo(tarfile.TarInfo):
    """tarfile's header parse with a fast path for the headers shards have: a plain regular file
    (type "0", octal size and checksum, no ustar prefix). Only the fields the loader and tarfile's
    stream read (name, size, type, checksum) are parsed then; any other header, or one that does
    not check out, takes tarfile's own ``frombuf`` (its errors included). ~2x fewer CPU seconds
    per member than tarfile's full parse of 16 fields."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        head = _plain_header(buf, encoding, errors)
        if head is None:
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.name, obj.size, obj.chksum = head
        obj.type = tarfile.REGTYPE
        return obj


def _octal(field: bytes) -> int:
    """tarfile's ``nti`` for an octal field (base-256 ones raise: tarfile's parse takes them)."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256")
    end = field.find(b"\0")
    return int(field[: len(field) if end < 0 else end].decode("ascii").strip() or "0", 8)


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def _is_meta(fname: str) -> bool:
    return _META.match(fname) is not None


def _base_plus_ext(path: str) -> tuple[str | None, str | None]:
    match = _KEY_EXT.match(path)
    return (None, None) if match is None else (match.group(1), match.group(2))


def _valid(sample: dict[str, Any] | None) -> bool:
    """webdataset's valid_sample: a sample, not flagged ``__bad__``."""
    return bool(sample) and not sample.get("__bad__", False)


NO_IMAGE = torch.empty(0)  # a sample's pixels when the loader is asked for none


def sample_pairs(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The captions of a sample's json: its ``pairs`` (one sample per image), or the sample
    itself as its one pair (shards written with one sample per pair)."""
    pairs = meta.get("pairs")
    return pairs if pairs is not None else [meta]


def row_key(sample_key: str, pair_id: str, copy: int) -> str:
    """A caption row's key, one per (pair, copy): the key of its sample in shards of one sample
    per pair (``pair_id``, ``{pair_id}_aug{copy}``), so feature caches and predictions keep
    their keys."""
    return f"{pair_id}_aug{copy}" if copy else pair_id


CAPTIONS = ("one", "all")


def caption_choice(seed: int, epoch: int, key: str, n: int) -> int:
    """The caption of an image sample a training epoch reads (``captions="one"``): seeded by
    (seed, epoch, sample key) only, so every rank, worker layout and a resumed epoch agree."""
    return derive_seed("caption", seed, epoch, key) % n if n > 1 else 0


class DecodeSample:
    """Raw tar sample -> caption rows {image (uint8 (H, W, 3): collate makes it (3, H, W)
    floats), text, label, key (the pair's row), sample_key (the image sample), image_id,
    caption_id, meta}. ``captions``: "all" yields a row per caption, the image decoded once
    for them all; "one" one row per sample, the caption ``caption_choice`` picks."""

    def __init__(
        self,
        augment: Sequence[TransformSpec],
        seed: int,
        epoch: int,
        skips: SkipCounter,
        audio: bool = False,
        images: bool = True,
        captions: str = "all",
    ) -> None:
        self.specs = [TransformSpec.model_validate(s) for s in augment]
        self.seed, self.epoch, self.skips = seed, epoch, skips
        self.audio = audio  # shards with a third modality: every row gets `audio` (None = absent)
        self.images = images  # False: the frozen-feature cache stands in, no pixels decoded
        if captions not in CAPTIONS:
            raise InputError(f"loader: captions must be one of {CAPTIONS}, got {captions!r}")
        self.captions = captions
        create_augment(self.specs)  # fail fast in the caller's process on a bad spec

    def __call__(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        compose = create_augment(self.specs)  # built in the worker: nothing to pickle
        for sample in src:
            try:
                rows = self.decode(sample, compose)
            except Exception as exn:  # any broken sample: count it, say which, go on
                self.skips(BadSample(sample.get("__key__"), sample.get("__url__"), exn))
                continue
            yield from rows

    def decode(self, sample: dict[str, Any], compose: Any) -> list[dict[str, Any]]:
        """The rows of one sample; online augmentation is seeded by (seed, epoch, sample key)."""
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        pairs = sample_pairs(meta)
        if not pairs:
            raise ValueError("no captions")
        picked = range(len(pairs))
        if self.captions == "one":
            i = caption_choice(self.seed, self.epoch, key, len(pairs))
            picked = range(i, i + 1)
        if self.images:
            pixels = decode_rgb(sample["jpg"])  # uint8 (H, W, 3): to_tensor_batch in collate
            if compose is not None:
                seed = derive_seed("online", self.seed, self.epoch, key)
                pixels = apply_augment(compose, pixels, seed)
        else:
            pixels = NO_IMAGE
        old = "pairs" not in meta  # one sample per pair: its key is the row's
        copy = int(meta.get("copy", 0))
        rows = []
        for i in picked:
            pair = pairs[i]
            label = int(pair.get("label_index", -1))
            flac = sample.get("flac" if old else f"{i}.flac")
            rows.append({
                # numpy, not a tensor: pickled with the chunk, no shared-memory file per clip
                **({"audio": clip_features(flac) if flac else None} if self.audio else {}),
                "image": pixels,  # one array for every row of the sample: decoded once
                "text": sample["txt"].decode("utf-8") if old else pair["caption"],
                "label": label,
                # every class of a multi-label; without label_indices: the one label, if any
                "labels": list(pair.get("label_indices") or ([label] if label >= 0 else [])),
                "value": label_value(pair.get("label")),
                "label_text": pair.get("label"),
                "key": key if old else row_key(key, pair["pair_id"], copy),
                "sample_key": key,
                "image_id": meta.get("image_id"),
                "caption_id": pair.get("caption_id"),
                "meta": pair.get("meta") or {},
            })  # fmt: skip
        return rows


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
                yield self.pack(rows, self.skips.items[reported:])
                reported, rows = self.skips.n, []
        if rows or self.skips.n > reported:
            yield self.pack(rows, self.skips.items[reported:])

    @staticmethod
    def pack(rows: list[dict[str, Any]], skipped: list[str]) -> dict[str, Any]:
        """Stack the images once so the chunk crosses the process boundary as one tensor: uint8
        (n, H, W, 3), a quarter of the floats' bytes (``NO_IMAGE`` rows: (n, 0))."""
        pixels = [r.pop("image") for r in rows]
        if not pixels:
            images = torch.empty(0)
        elif isinstance(pixels[0], torch.Tensor):
            images = torch.stack(pixels)
        else:
            images = torch.from_numpy(np.stack(pixels))
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
    """A batch of rows and their images (uint8 (H, W, 3) each, or ``NO_IMAGE``): image
    (B, 3, H, W) as ``to_tensor`` makes it (or (B, 0)), label (B,) (-1 = none), labels (B, L) (the classes of a
    multi-label, -1 padded), value (B,) (numeric label, nan = none), lists for the rest; with
    audio shards also audio (B, 1, N_MELS, FRAMES) and audio_mask (B,) (False = no clip)."""
    return {
        **(collate_audio(rows) if rows and "audio" in rows[0] else {}),
        "image": _batch_pixels(images),  # (B, 3, H, W)
        "text": [r["text"] for r in rows],
        "label": torch.tensor([r["label"] for r in rows], dtype=torch.long),  # (B,)
        "labels": pad_labels([r["labels"] for r in rows]),  # (B, L)
        "value": torch.tensor([r["value"] for r in rows], dtype=torch.float32),  # (B,)
        "label_text": [r["label_text"] for r in rows],
        "key": [r["key"] for r in rows],
        "sample_key": [r["sample_key"] for r in rows],
        "image_id": [r["image_id"] for r in rows],
        "caption_id": [r["caption_id"] for r in rows],
        "meta": [r["meta"] for r in rows],
    }


def _batch_pixels(images: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(images)
    return to_tensor_batch(stacked) if stacked.dtype == torch.uint8 else stacked


def collate_audio(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The batch's log-mels, zeros where a sample has no clip, and the presence mask."""
    from mmpipe.audio import FRAMES, N_MELS

    audio = np.zeros((len(rows), 1, N_MELS, FRAMES), dtype=np.float32)
    present = [r["audio"] is not None for r in rows]
    for i, r in enumerate(rows):
        if r["audio"] is not None:
            audio[i] = r["audio"]
    return {"audio": torch.from_numpy(audio), "audio_mask": torch.tensor(present)}


class Rebatch:
    """Chunks from all workers -> batches of exactly ``batch_size`` (last one partial unless drop).

    Also applies ``limit`` (samples per rank), ``skip_batches`` (resume inside an epoch) and
    keeps ``stats``: samples read, items skipped by handlers, samples expected for this rank.
    A full pass that could not read more than ``max_bad`` of its expected samples fails.
    """

    def __init__(
        self,
        batch_size: int,
        drop_last: bool,
        skip_batches: int,
        limit: int | None,
        expected: int,
        split: str = "",
        max_bad: int | None = 0,
    ) -> None:
        self.batch_size, self.drop_last, self.skip_batches = batch_size, drop_last, skip_batches
        self.limit, self.expected, self.split, self.max_bad = limit, expected, split, max_bad
        self.stats: dict[str, Any] = {"samples": 0, "skipped": 0, "expected": expected, "bad": []}

    def __call__(self, chunks: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        self.stats.update(samples=0, skipped=0, bad=[])
        to_skip = self.skip_batches * self.batch_size
        rows: list[dict[str, Any]] = []
        images: list[torch.Tensor] = []
        for chunk in chunks:
            self.stats["skipped"] += len(chunk["skipped"])
            self.stats["bad"].extend(chunk["skipped"])
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
        """Fail (or, within ``max_bad``, say loudly) when the pass missed samples it promised."""
        s = self.stats
        missing = s["expected"] - s["samples"] if self.limit is None else 0
        bad = max(s["skipped"], missing)
        if not bad:
            return
        shards = sorted({item.split(": ", 1)[0] for item in s["bad"]})
        what = (
            f"{self.split or 'loader'}: read {s['samples']} of {s['expected']} expected samples, "
            f"{s['skipped']} unreadable (shards: {', '.join(shards) or 'unknown'})"
        )
        if self.max_bad is not None and bad > self.max_bad:
            first = f"; first: {s['bad'][0]}" if s["bad"] else ""
            raise InputError(f"{what}, more than train.max_bad_samples={self.max_bad}{first}")
        log.warning("%s; within the %s allowed", what, self.max_bad)


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
    max_bad_samples: int | None = 0,
    images: bool = True,
    pin_memory: bool = False,
    captions: str = "all",
) -> wds.WebLoader:
    """Batches of one split for one epoch (see the module docstring); ``.stats`` counts samples.

    Every shard is verified against the manifest first (size, sha256). A pass that cannot read
    more than ``max_bad_samples`` of its samples fails naming the shards (None: only warn).

    ``shuffle_buffer > 0`` shuffles shard order and samples, seeded by (seed, epoch). With
    ``world_size > 1`` each rank gets ``count // world_size`` samples, disjoint across ranks.
    ``skip_batches`` resumes an epoch: the same call without it yields those batches first.
    ``images=False`` decodes no pixels (batches' ``image`` is (B, 0)): the frozen-feature cache
    stands in for them. ``pin_memory``: page-locked batches for asynchronous copies to a GPU.

    ``captions`` (shards of one sample per image with all its captions): "all" (evaluation)
    yields a row per caption, the image decoded once for its rows; "one" (training) one row per
    image sample, its caption chosen by (seed, epoch, sample key) (``caption_choice``): the
    same on every rank and in a resumed epoch, a new choice each epoch, and never two captions
    of one image in a batch. Counts, ``limit`` and ``skip_batches`` are in rows. "all" over
    samples of several captions reads a split whole (``world_size`` 1): a rank's share of the
    captions is not known in advance.
    """
    if batch_size < 1 or not 0 <= rank < world_size:
        raise InputError(
            f"loader: need batch_size >= 1 and 0 <= rank < world_size, "
            f"got {batch_size}, {rank}, {world_size}"
        )
    manifest = None if is_url(shard_dir) else read_manifest(shard_dir)
    shards = split_shards(shard_dir, split, manifest)
    total = sum(s.count for s in shards)
    pairs = (manifest or read_manifest(shard_dir)).pairs(split)
    if captions == "all" and world_size > 1 and pairs != total:
        raise InputError(
            f"loader: captions='all' over {split}'s {total} samples of {pairs} captions needs "
            "world_size 1 (a rank's share of the captions is not known in advance)"
        )
    shuffle = shuffle_buffer > 0
    rotate = derive_seed("rotate", seed, epoch) % max(total, 1) if shuffle else 0
    skips = SkipCounter()
    dataset = wds.DataPipeline(
        ShardSource(shards, shuffle, seed, epoch),
        wds.split_by_worker,
        TarSamples(skips),
        RankFilter(shards, rank, world_size, rotate),
        SampleShuffle(shuffle_buffer, seed, epoch, rank) if shuffle else None,
        DecodeSample(list(augment), seed, epoch, skips, has_audio(shard_dir), images, captions),
        Chunk(max(1, min(batch_size, 256)), skips),
    )
    expected = total // world_size if world_size > 1 else total  # image samples ("one")
    if captions == "all" and world_size == 1:
        expected = pairs
    rebatch = Rebatch(batch_size, drop_last, skip_batches, limit, expected, split, max_bad_samples)
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        pin_memory=pin_memory,
        persistent_workers=False,
        worker_init_fn=functools.partial(_init_loader_worker, env=_store_env())
        if num_workers
        else None,
        # never fork the trainer: under Prefect a forked worker ran Prefect's at-exit hooks and
        # died with exit code 1 at the end of each epoch (see _init_loader_worker)
        multiprocessing_context=pool_context() if num_workers else None,
    ).compose(rebatch)
    loader.stats = rebatch.stats
    return loader


def has_audio(shard_dir: str | Path) -> bool:
    """Whether the shards carry the audio modality (the manifest's ``audio`` entry); local or
    published on an object store."""
    return read_manifest(shard_dir).audio is not None


# what a loader worker needs of the trainer's environment to open object-store shards
STORE_ENV = ("AWS_", "MLFLOW_S3_", "FSSPEC_", "GOOGLE_", "AZURE_")


def _store_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(STORE_ENV)}


def _init_loader_worker(worker_id: int, env: dict[str, str] | None = None) -> None:
    """Loader workers start from a forkserver, never a fork of the trainer: the trainer may run
    inside an orchestrator whose state must not leak into them (a forked worker of a Prefect
    task inherited Prefect's at-exit hooks, which fail outside the parent: "DataLoader worker
    exited unexpectedly with exit code 1"). Default SIGTERM, so the DataLoader's shutdown of a
    slow worker ends it quietly; Ctrl-C goes to the parent. ``env``: the object-store
    credentials and endpoint the trainer had when it made the loader (the forkserver's
    environment is the one it started with, maybe before they were set)."""
    os.environ.update(env or {})
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- raw access


def iterate_split(shard_dir: str | Path, split: str) -> Iterator[dict[str, Any]]:
    """Every stored caption row of a split in manifest order: a sample of one image with k
    captions gives k records, in its ``pairs`` order, sharing the image's bytes.

    Yields {__key__ (the row's key: ``row_key``), sample_key, __url__, jpg (bytes), txt (the
    caption), json (dict: the image's fields and the pair's, as one sample per pair held them)}.
    """
    for ref in split_shards(shard_dir, split):
        try:
            for sample in TarSamples()(iter([{"url": ref.url}])):
                meta = json.loads(sample["json"])
                if "pairs" not in meta:  # one sample per pair
                    yield {"__key__": sample["__key__"], "sample_key": sample["__key__"],
                           "__url__": ref.url, "jpg": sample["jpg"],
                           "txt": sample["txt"].decode("utf-8"), "json": meta}  # fmt: skip
                    continue
                image = {k: v for k, v in meta.items() if k != "pairs"}
                for pair in meta["pairs"]:
                    yield {
                        "__key__": row_key(sample["__key__"], pair["pair_id"], meta["copy"]),
                        "sample_key": sample["__key__"],
                        "__url__": ref.url,
                        "jpg": sample["jpg"],
                        "txt": pair["caption"],
                        "json": {**image, **pair},
                    }
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(
                f"{ref.url}: unreadable shard ({exc!r}); run `mmpipe shard` again"
            ) from None
