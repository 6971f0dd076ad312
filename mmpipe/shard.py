"""Stage `shard`: resize, augment offline, write WebDataset tar shards + manifest.json.

A sample is one image with all its captions (docs/shard-format.md): key image_id (a train copy
``{image_id}_aug{i}``), ``jpg``, ``json`` with the image's fields and its ``pairs`` in pair_id
order, ``txt`` the captions a line; audio collections add the clip of pair i as ``{i}.flac``.

Output bytes are a pure function of (pairs, images, params): samples are produced by a worker
pool with *ordered* imap in sorted key order, augmentation is seeded per (seed, image_id, copy),
and tar members carry fixed mtime/uid/gid/uname/mode, so 1 or N workers give identical shards.
Everything goes into ``out_dir``, which the stage driver makes a fresh staging directory and
switches in whole once the stage is done (mmpipe.commit): readers see the previous shards and
manifest or the new ones, never a mix. manifest.json is written last.

Streaming: pairs.parquet (sorted by (split, image_id, pair_id) by align) is read batch by batch,
cut into jobs of whole images, and at most a few jobs are in flight in the pool, so memory does
not grow with the number of pairs. Image
paths are relative to the data root that ingest recorded (``ingest.resolve_data_root``): the
shards hold no absolute path, so the same data gives the same bytes wherever it lives.
Each image is decoded once (one sample holds all its captions). ``shard.decode:
reduced`` (default): JPEGs at the largest DCT-domain reduction that keeps both sides >=
image_size, libjpeg-turbo's M/8 scales through simplejpeg (``_scaled_jpeg``), Pillow ``draft``
where that does not apply; ``full``: at full resolution. The manifest records the mode.

Undecodable images: with ``ingest.image_check: decode`` ingest decoded every image, so one
shard cannot decode has changed since ingest: an InputError. With ``header`` (the default)
shard's decode is the only one (curate's, when its hashing or scorer is on, may come first and
reject the image there): the pairs of an image it cannot decode are left out of the
shards, each pair a named reject in ``rejects.jsonl`` (ingest's record schema plus pair_id and
image_id; reason ``undecodable_image``), counted in the manifest (pairs in = pairs sharded +
pairs rejected). Rejects come back from the workers in pair order, so the file and the shards
are the same bytes for any worker count.

Resize policy: centre-crop to a square, then an antialiased resize to image_size (HAMMING when
shrinking, BICUBIC when enlarging: ``square_resize``). Keeps aspect ratio; objects at the far
edges of non-square photos can be cropped, as in CLIP's preprocessing.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
import time
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from mmpipe.config import ShardParams, section_hash
from mmpipe.errors import InputError, ValidationFailed, check
from mmpipe.faults import fault_point
from mmpipe.incremental import (
    MembersWriter,
    Reuse,
    link_shards,
    next_index,
    pair_digest,
    plan_reuse,
)
from mmpipe.io import (
    IMAGE_MMAP_THRESHOLD,
    iter_batches,
    read_json,
    sha256_file,
    use_system_arrow_allocator,
)
from mmpipe.layout import SPLITS
from mmpipe.manifest import AudioEntry, Manifest, ShardEntry, SplitEntry, write_manifest
from mmpipe.parallel import dask_map, ordered_map, process_pool
from mmpipe.progress import tqdm  # a bar on a terminal, a log line every minute elsewhere
from mmpipe.storage import REJECTS

log = logging.getLogger(__name__)

MTIME = 0  # fixed tar member mtime: identical bytes run to run
JOB_PAIRS = 32  # pairs per pool task (whole images): amortises IPC, keeps streaming ordered


# ----------------------------------------------------------------------------- image ops


def open_for_size(path: str | Path, size: int) -> Image.Image:
    """Open an image for a (size, size) output, decode set up at the cheapest adequate scale."""
    img = Image.open(path)
    _draft(img, size)
    return img


def _draft(img: Image.Image, size: int) -> None:
    """JPEG: DCT-domain downscale by 2/4/8 while both sides stay >= size (no-op otherwise).

    Decoding a 4000x3000 photo for a 256 px sample at 1/8 scale does an eighth of the IDCT and
    colour work; the final resize still starts from >= size pixels per side.
    """
    if img.format in ("JPEG", "MPO") and getattr(img, "tile", None):
        img.draft("RGB", (size, size))


def _scaled_jpeg(img: Image.Image, size: int) -> Image.Image | None:
    """An opened, not yet loaded, RGB or greyscale JPEG decoded at the smallest of libjpeg-turbo's
    M/8 scales that keeps both sides >= size, as RGB; None when no scale below 1 keeps them,
    for other images (CMYK, not JPEG, already loaded), or when libjpeg reports anything wrong.

    Pillow's ``draft`` scales by 1/2, 1/4 or 1/8 only: a 640x480 photo for a 256 px sample is
    decoded whole. At 5/8 (400x300) the IDCT, colour conversion and the resize do ~40% less
    work; the whole entropy-coded stream is still read. simplejpeg runs in strict mode: any
    libjpeg warning (truncation, corrupt data) returns None, so the caller's Pillow decode gives
    the verdict and the message exactly as before. Same DCT-domain reduction as ``draft``, and
    as that one it is sharper, less smooth than a full-resolution resize (benchmarks/README).
    """
    fp = getattr(img, "fp", None)
    w, h = img.size
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or fp is None or not img.tile:
        return None
    if -(-min(w, h) * 7 // 8) < size:  # 7/8 would go below size: nothing to gain
        return None
    import simplejpeg

    fp.seek(0)
    try:
        pixels = simplejpeg.decode_jpeg(fp.read(), "RGB", min_height=size, min_width=size)
    except ValueError:
        return None
    return Image.fromarray(pixels)


def missing_image(path: str | Path) -> InputError:
    """The error for an original image gone since ingest (shard, curate)."""
    return InputError(f"{path}: image file not found (moved since ingest? re-run `mmpipe ingest`)")


def open_original(
    path: str | Path,
    read: Callable[[Image.Image], Any],
    undecodable: Callable[[Exception], Any] | None = None,
) -> Any:
    """``read(opened image)``; a missing or unreadable original is an InputError naming it,
    or, with ``undecodable``, an unreadable one gives ``undecodable(the error)``."""
    try:
        with Image.open(path) as img:
            return read(img)
    except FileNotFoundError:
        raise missing_image(path) from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as exc:
        if undecodable is not None:
            return undecodable(exc)
        raise InputError(f"{path}: unreadable image ({exc}); re-run `mmpipe ingest`") from None


def load_rgb(path: str | Path, size: int | None = None) -> Image.Image:
    """Open an original image fully, EXIF-transposed, RGB; unreadable files are InputErrors.

    With ``size``, a JPEG is decoded at the largest reduction keeping both sides >= size.
    """

    def read(img: Image.Image) -> Image.Image:
        if size is not None:
            _draft(img, size)
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")

    return open_original(path, read)


def square_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square of ``img`` resized to (size, size), antialiased, in one pass.

    Shrinking uses HAMMING (a Hamming-windowed sinc of support 1, widened by the scale factor):
    0.65x the CPU of BICUBIC on coco-mini's photos (1.2 vs 1.8 ms, 480 px -> 256 px) and as
    close to a LANCZOS reference (39 dB PSNR) as img2dataset's OpenCV INTER_AREA; BICUBIC (45
    dB) was a third of shard's CPU. Enlarging keeps BICUBIC, the better interpolator. The crop
    is a resize ``box``, so the full-size image is never copied.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    box = (left, top, left + side, top + side)
    method = Image.Resampling.HAMMING if side > size else Image.Resampling.BICUBIC
    return img.resize((size, size), method, box=box)


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose)
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def sample_image(img: Image.Image, size: int, decode: str = "reduced") -> Image.Image:
    """The stored sample picture of an opened image: upright, RGB, centre square, size x size.

    ``decode`` (shard.decode): "reduced" decodes a JPEG at the smallest M/8 scale keeping
    ``size`` (``_scaled_jpeg``, else Pillow's draft), "full" at full resolution.
    Cheapest order: decode at reduced scale, crop + resize in the file's own
    orientation, then turn the small result upright (the centre square of a rotated image is the
    rotated centre square), so no full-size copy is made for the transpose or the mode.
    """
    orientation = img.getexif().get(0x0112)
    decoded = None
    if decode == "reduced":
        decoded = _scaled_jpeg(img, size)
        if decoded is None:
            _draft(img, size)
    if decoded is None:
        img.load()
        decoded = img if img.mode == "RGB" else img.convert("RGB")
    small = square_resize(decoded, size)
    method = _UPRIGHT.get(orientation)
    return small.transpose(method) if method is not None else small


def encode_jpeg(image: Image.Image | np.ndarray, quality: int) -> bytes:
    """JPEG bytes (Pillow's encoder is deterministic for a given libjpeg)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def preprocess_image(
    img: Image.Image, image_size: int, quality: int = 90, decode: str = "reduced"
) -> bytes:
    """Exactly the stored (un-augmented) sample image: ``sample_image`` encoded as JPEG.

    Give it an image as opened (not yet loaded): a JPEG is then decoded at the same reduced
    scale as in shard, so the bytes equal the stored sample's. An already loaded image is
    resized from full resolution (equal to the stored sample when no reduction applied).
    """
    return encode_jpeg(sample_image(img, image_size, decode), quality)


# ----------------------------------------------------------------------------- worker side

_STATE: dict[str, Any] = {}  # per process: params, data root, augment pipelines


def _init_worker(params: dict[str, Any], root: str, reject_undecodable: bool = False) -> None:
    """Pool initializer: params, data root, the augment pipelines that will be used, and
    whether an undecodable image is a reject (ingest.image_check: header) or an error."""
    p = ShardParams.model_validate(params)
    _STATE.update(
        p=p, root=Path(root), reject_undecodable=reject_undecodable, augment=_pipelines(p)
    )


def _pipelines(p: ShardParams) -> dict[str, Any]:
    """The augment pipelines this run applies; albumentations is imported only if one is used."""
    out: dict[str, Any] = {"train": None, "eval": None}
    if p.copies and p.train_augment or p.eval_augment:
        from mmpipe.augment import create_augment

        out["train"] = create_augment(p.train_augment) if p.copies else None
        out["eval"] = create_augment(p.eval_augment)
    return out


def _undecodable(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _base_image(pair: dict[str, Any]) -> tuple[Image.Image, bytes] | str:
    """The resized image of a pair's image and its plain JPEG; under ``reject_undecodable``,
    why the image cannot be decoded instead. (One call per image: a sample holds all of its
    captions, so nothing is cached.)"""
    p: ShardParams = _STATE["p"]
    path = _STATE["root"] / pair["image_path"]
    on_error = _undecodable if _STATE["reject_undecodable"] else None
    img = open_original(
        path, lambda original: sample_image(original, p.image_size, p.decode), on_error
    )
    return img if isinstance(img, str) else (img, encode_jpeg(img, p.jpeg_quality))


def _augmented_jpeg(img: Image.Image, which: str, image_id: str, copy: int) -> bytes:
    """Augment with a seed from (params seed, image_id, copy): independent of worker layout."""
    from mmpipe.augment import apply_augment, derive_seed

    p: ShardParams = _STATE["p"]
    base = np.asarray(img)  # (S, S, 3) uint8
    out = apply_augment(_STATE["augment"][which], base, derive_seed(p.seed, image_id, copy))
    if out.shape != base.shape:  # a geometric transform changed the size: restore the contract
        out = np.asarray(
            Image.fromarray(out).resize((p.image_size, p.image_size), Image.Resampling.LANCZOS)
        )
    return encode_jpeg(out, p.jpeg_quality)


# what each caption of a sample keeps of its pair (json's "pairs", in pair_id order)
PAIR_FIELDS = (
    "pair_id", "caption_id", "caption", "label", "label_index",
    "label_indices",  # multi-hot classes (multilabel)
    "source", "meta",
)  # fmt: skip


def _sample(group: list[dict[str, Any]], key: str, jpg: bytes, copy: int) -> dict[str, Any]:
    """One webdataset sample of an image and all its captions (json sorted: stable bytes)."""
    first = group[0]
    meta = {  # the loader and evaluate read these fields: keep them stable
        "image_id": first["image_id"],
        "split": first["split"],
        "image_path": first["image_path"],  # relative to the data root
        "copy": copy,
        "pairs": [{f: pair[f] for f in PAIR_FIELDS} for pair in group],
    }
    body = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    # "__split__" routes the sample to its writer; the tar writer skips "_" keys
    return {
        "__key__": key,
        "__split__": first["split"],
        "__image__": first["image_id"],
        "__pairs__": [(pair["pair_id"], pair["__digest__"]) for pair in group],
        "jpg": jpg,
        # one caption a line (ingest's normalise_text leaves no newline in a caption)
        "txt": "\n".join(pair["caption"] for pair in group).encode("utf-8"),
        "json": body,
    }


def encode_image(group: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The samples of one image (its pairs, consecutive in pairs.parquet) in sorted key order:
    the image with all its captions, then its train copies; or, when the image cannot be
    decoded (under ``reject_undecodable``), a reject per pair."""
    image = _base_image(group[0])
    if isinstance(image, str):
        return [_reject(pair, image) for pair in group]
    return _with_audio(group, _image_samples(group, image))


def _reject(pair: dict[str, Any], detail: str) -> dict[str, Any]:
    """A pair left out: ingest's reject record (plus the pair and image) as a pseudo-sample."""
    record = {
        "kind": "pair",
        "file": pair["image_path"],
        "line": None,
        "reason": "undecodable_image",
        "detail": detail,
        "duplicate_of": None,
        "pair_id": pair["pair_id"],
        "image_id": pair["image_id"],
        "split": pair["split"],
    }
    return {"__key__": pair["pair_id"], "__split__": pair["split"], "__reject__": record}


def _image_samples(
    group: list[dict[str, Any]], image: tuple[Image.Image, bytes]
) -> list[dict[str, Any]]:
    p: ShardParams = _STATE["p"]
    base, plain = image
    image_id, split = group[0]["image_id"], group[0]["split"]
    if split != "train":
        jpg = (
            plain
            if _STATE["augment"]["eval"] is None
            else _augmented_jpeg(base, "eval", image_id, 0)
        )
        return [_sample(group, image_id, jpg, 0)]
    samples = [_sample(group, image_id, plain, 0)]
    # keys sort as strings ("_aug10" < "_aug2"), so copies are emitted in that order
    for i in sorted(range(1, p.copies + 1), key=str):
        jpg = _augmented_jpeg(base, "train", image_id, i)
        samples.append(_sample(group, f"{image_id}_aug{i}", jpg, i))
    return samples


def _with_audio(group: list[dict[str, Any]], samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The clip of the image's i-th pair (json's ``pairs[i]``), when it has one, as member
    ``{i}.flac`` of every sample of the image (train copies too)."""
    if not any(pair.get("audio_path") for pair in group):
        return samples
    from mmpipe.audio import encode_flac

    clips = {
        f"{i}.flac": encode_flac(_STATE["root"] / pair["audio_path"])
        for i, pair in enumerate(group)
        if pair.get("audio_path")
    }
    return [{**s, **clips} for s in samples]


def encode_job(images: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """A pool task: the samples of consecutive images (each a list of its pairs)."""
    return [s for group in images for s in encode_image(group)]


# ----------------------------------------------------------------------------- writer side


def _tar_bytes(member_bytes: int) -> int:
    """Size of a closed tar holding members of this many bytes (end blocks + 10 KiB records)."""
    return -(-(member_bytes + 1024) // 10240) * 10240


def _member_bytes(sample: dict[str, Any]) -> int:
    """Header + padded payload of every member of one sample."""
    sizes = [len(v) for k, v in sample.items() if not k.startswith("_")]
    return sum(512 + -(-n // 512) * 512 for n in sizes)


class TarWriter:
    """WebDataset tar members ``{key}.{ext}`` (sorted ext), with fixed owner/mode/mtime.

    The same bytes as ``webdataset.TarWriter(user="mmpipe", group="mmpipe", mode=0o444, mtime=0)``
    without importing webdataset (and with it torch: 2 s of every shard run). The 512-byte
    header of a plain member (an ASCII name of <= 100 bytes: every key shard makes) is patched
    into a template made by ``tarfile`` itself, 8x cheaper than ``TarInfo.tobuf`` (~40 µs per
    member, ~15 % of shard's CPU); any other name goes through ``tarfile``'s own encoder.
    ``tests/unit/test_shard_tar.py`` checks the bytes against ``tarfile``'s stream writer.
    """

    def __init__(self, fh: Any) -> None:
        self.fh, self.offset = fh, 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample's members."""
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("_")):
            data = sample[ext]
            self._put(tar_header(f"{key}.{ext}", len(data)))
            self._put(data)
            pad = -len(data) % tarfile.BLOCKSIZE
            if pad:
                self._put(tarfile.NUL * pad)

    def _put(self, data: bytes) -> None:
        self.fh.write(data)
        self.offset += len(data)

    def close(self) -> None:
        """Write the end-of-archive blocks, padded to a whole record (as tarfile's "w|")."""
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self._put(tarfile.NUL * (-self.offset % tarfile.RECORDSIZE))

    def abort(self) -> None:
        """Give up on a failed write (a full disk): nothing is buffered here, the caller closes
        the file."""


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, MTIME, 0o444
    info.uname = info.gname = "mmpipe"
    return info


# header of a member named "" of size 0: name (bytes 0-100), size (124-136) and the checksum
# (148-156) are the only fields that differ between shard's members
_HEADER = _tarinfo("", 0).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
_HEADER_SUM = sum(_HEADER) - sum(_HEADER[124:136]) - sum(_HEADER[148:156]) + 8 * ord(" ")


def tar_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` (PAX format, stream mode) writes for one shard member."""
    raw = name.encode("ascii", "ignore")
    if len(raw) != len(name) or len(raw) > 100 or not raw or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
    size_field = b"%011o\0" % size
    chksum = _HEADER_SUM + sum(raw) + sum(size_field)
    return b"".join((
        raw, _HEADER[len(raw):124], size_field, _HEADER[136:148], b"%06o\0 " % chksum,
        _HEADER[156:],
    ))  # fmt: skip


class SplitWriter:
    """Sequential shards of one split in a directory, rotated on maxcount / maxsize (file bytes).

    Why not ``wds.ShardWriter``: it rotates only *after* a shard has passed ``maxsize``, so a
    shard can exceed it by a whole sample; here a sample that would push the closed tar over
    ``maxsize`` starts the next shard (computed from tar's own block arithmetic), so ``maxsize``
    is a hard bound that storage and DDP shard-count planning can rely on. It also lets the
    stage write tars without importing webdataset/torch (see ``TarWriter``).
    """

    def __init__(
        self, out_dir: Path, split: str, maxcount: int, maxsize: int, first: int = 0
    ) -> None:
        self.out_dir, self.split, self.maxcount, self.maxsize = out_dir, split, maxcount, maxsize
        self.first = first  # number of the first shard (after those an incremental run reuses)
        self.shards: list[dict[str, Any]] = []
        self.writer: Any = None
        self.fh: Any = None
        self.count = self.size = self.pairs = 0

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample, starting a new shard if it would exceed maxcount or maxsize."""
        grow = _member_bytes(sample)
        full = self.count >= self.maxcount or _tar_bytes(self.size + grow) > self.maxsize
        if self.writer is None or (self.count and full):
            self._next()
        self.writer.write(sample)
        self.count += 1
        self.pairs += len(sample["__pairs__"])
        self.size += grow

    def _next(self) -> None:
        self._finish()
        name = f"{self.split}-{self.first + len(self.shards):06d}.tar"
        self.fh = (self.out_dir / name).open("wb")
        self.writer = TarWriter(self.fh)
        self.shards.append({"name": name, "count": 0})
        self.count = self.size = self.pairs = 0

    def _finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.fh.close()
        path = self.out_dir / self.shards[-1]["name"]
        self.shards[-1].update(
            count=self.count, pairs=self.pairs, bytes=path.stat().st_size, sha256=sha256_file(path)
        )
        self.writer = None
        fault_point("shard:shard-written")

    def close(self) -> list[ShardEntry]:
        """Finish the last shard; return its entries (name, count, pairs, bytes, sha256) measured
        from the files."""
        self._finish()
        return [ShardEntry(**shard) for shard in self.shards]

    def abort(self) -> None:
        """Drop the open shard after an error (the stage's staging directory goes with it)."""
        if self.writer is not None:
            self.writer.abort()
            with contextlib.suppress(OSError):
                self.fh.close()
            self.writer = None


class RejectsWriter:
    """``rejects.jsonl`` of the pairs left out (streamed, in pair order), counted per split;
    ``strict`` (ingest.strict): the first one fails the stage instead, naming the image."""

    def __init__(self, path: Path, strict: bool = False) -> None:
        self.fh = path.open("w", encoding="utf-8")
        self.per_split = dict.fromkeys(SPLITS, 0)
        self.strict = strict

    def add(self, record: dict[str, Any]) -> None:
        """Write one reject record (strict: raise ValidationFailed)."""
        if self.strict:
            raise ValidationFailed(
                f"{record['file']}: {record['reason']} ({record['detail']}); ingest.strict is "
                "true and ingest.image_check is header, so shard's decode is the check"
            )
        self.fh.write(json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n")
        self.per_split[record["split"]] += 1

    def close(self) -> None:
        """Finish the file."""
        self.fh.close()


# ----------------------------------------------------------------------------- stage


def header_checked(ingest_dir: Path) -> tuple[bool, bool]:
    """Whether ingest only checked headers (``ingest.image_check: header``): then shard's is the
    one full decode and an undecodable image is a reject, not an error; and whether ingest ran
    strict (then that reject fails the stage). Curate applies the same rule; without ingest's
    report.json, decode mode (an undecodable image is an error)."""
    path = Path(ingest_dir) / "report.json"
    report = read_json(path) if path.is_file() else {}
    return report.get("image_check") == "header", bool(report.get("strict", False))


def open_pairs(align_dir: Path, ingest_dir: Path) -> tuple[pq.ParquetFile, dict[str, Any], Path]:
    """pairs.parquet (opened, not read), the align report and the data root of the images."""
    from mmpipe.align import PAIR_COLUMNS, read_align_report
    from mmpipe.ingest import resolve_data_root

    path = align_dir / "pairs.parquet"
    if not path.is_file():
        raise InputError(f"{path}: not found; run `mmpipe align` first")
    report = read_align_report(align_dir)
    pairs = pq.ParquetFile(path)
    missing = [c for c in PAIR_COLUMNS if c not in pairs.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; re-run `mmpipe align`")
    if pairs.metadata.num_rows != sum(report.get("pairs_per_split", {}).values()):
        raise InputError(
            f"{path}: {pairs.metadata.num_rows} pairs but report.json says "
            f"{report.get('pairs_per_split')}; re-run `mmpipe align`"
        )
    return pairs, report, resolve_data_root(ingest_dir)


def _images(pairs: pq.ParquetFile, where: Path) -> Iterator[list[dict[str, Any]]]:
    """The pairs of each image as dicts (meta parsed), consecutive in pairs.parquet; order
    checked."""
    last: tuple[int, str, str] = (-1, "", "")
    from mmpipe.align import PAIR_COLUMNS

    columns = [*PAIR_COLUMNS, *[c for c in ("audio_path",) if c in pairs.schema_arrow.names]]
    group: list[dict[str, Any]] = []
    for batch in iter_batches(pairs, JOB_PAIRS, columns):
        for pair in batch.to_pylist():
            key = (SPLITS.index(pair["split"]), pair["image_id"], pair["pair_id"])
            if key <= last:
                raise InputError(
                    f"{where}: pairs not sorted by (split, image_id, pair_id) at "
                    f"{pair['pair_id']}; re-run `mmpipe align`"
                )
            last = key
            pair["__digest__"] = pair_digest(pair)  # of the row as stored (incremental reuse)
            try:
                pair["meta"] = json.loads(pair["meta"] or "{}")
            except json.JSONDecodeError:
                raise InputError(f"{where}: pair {pair['pair_id']}: meta is not JSON") from None
            if group and key[:2] != (SPLITS.index(group[0]["split"]), group[0]["image_id"]):
                yield group
                group = []
            group.append(pair)
    if group:
        yield group


def _jobs(
    pairs: pq.ParquetFile, where: Path, done: Container[str] = ()
) -> Iterator[list[list[dict[str, Any]]]]:
    """Whole images (lists of their pairs), about JOB_PAIRS pairs a job: an image's pairs are
    never split across two jobs. Images in ``done`` (all their samples in reused shards,
    incremental) are left out."""
    job: list[list[dict[str, Any]]] = []
    n = 0
    for group in _images(pairs, where):
        if group[0]["image_id"] in done:
            continue
        job.append(group)
        n += len(group)
        if n >= JOB_PAIRS:
            yield job
            job, n = [], 0
    if job:
        yield job


def encode_all(
    pairs: pq.ParquetFile,
    p: ShardParams,
    root: Path,
    where: Path,
    done: Container[str] = (),
    reject_undecodable: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Samples per job, in order, from p.workers processes (inline when 1) or a Dask cluster."""
    initargs = (p.model_dump(mode="json"), str(root), reject_undecodable)
    if p.executor == "dask":
        jobs = _jobs(pairs, where, done)
        on = dict(address=p.address, workers=p.workers, chunksize=2)
        yield from dask_map(encode_job, jobs, **on, initializer=_init_worker, initargs=initargs)
        return
    if p.workers == 1:
        _init_worker(*initargs)
        yield from map(encode_job, _jobs(pairs, where, done))
        return
    # this module is preloaded in the forkserver (parallel.PRELOAD); ordered_map keeps at most a
    # few jobs in flight, so the pairs are never all in memory (Pool.imap would queue them all)
    with process_pool(p.workers, initializer=_init_worker, initargs=initargs) as pool:
        yield from ordered_map(
            pool, encode_job, _jobs(pairs, where, done), chunksize=2, depth=4 * p.workers
        )


def write_splits(
    pairs: pq.ParquetFile,
    p: ShardParams,
    root: Path,
    out_dir: Path,
    where: Path,
    reuse: Reuse | None = None,
    rejects: RejectsWriter | None = None,
) -> tuple[dict[str, SplitEntry], int]:
    """Write every split's shards and members.parquet into out_dir (beside ``reuse``'s shards);
    the manifest's `splits` mapping (reused + new shards) and the number of new samples.
    With ``rejects``, the pairs of an image that cannot be decoded are written there instead."""
    reuse = reuse or Reuse()
    members = MembersWriter(out_dir, reuse.members)
    writers = {
        s: SplitWriter(out_dir, s, p.maxcount, p.maxsize, next_index(reuse, s)) for s in SPLITS
    }
    total = pairs.metadata.num_rows - reuse.done_pair_count
    rejecting = rejects is not None
    try:
        with tqdm(total=total, desc="shard", unit="pair", disable=None) as bar:
            for samples in encode_all(pairs, p, root, where, reuse.done_images, rejecting):
                done = 0
                for sample in samples:
                    if "__reject__" in sample:
                        rejects.add(sample["__reject__"])  # type: ignore[union-attr]
                        done += 1
                        continue
                    if sample["__key__"] == sample["__image__"]:
                        done += len(sample["__pairs__"])  # copy 0: the image's pairs
                    if sample["__key__"] not in reuse.keys:
                        writer = writers[sample["__split__"]]
                        writer.write(sample)
                        members.add(sample, writer.shards[-1]["name"])
                bar.update(done)
        splits = {}
        for split, writer in writers.items():
            shards = sorted(reuse.shards.get(split, []) + writer.close(), key=lambda e: e.name)
            splits[split] = SplitEntry(
                count=sum(s.count for s in shards),
                pairs=sum(s.pairs if s.pairs is not None else s.count for s in shards),
                shards=shards,
            )
        members.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        members.abort()
        raise
    return splits, members.new


# What makes a sample's bytes besides the params: bump when the decode, resize or encode changes
# (2: JPEGs decoded at libjpeg-turbo's M/8 scales; 3: one sample per image with all its
# captions, augmentation seeded per image), so an incremental run never reuses shards written
# the old way beside samples written the new way.
SAMPLE_CODE = 3


def output_params_hash(p: ShardParams) -> str:
    """section_hash of the params with where they run normalised (`workers`, `executor`,
    `address`) and without `output` (where the shards are published): none can change a byte;
    with SAMPLE_CODE and the decoders' versions (Pillow, simplejpeg), which can."""
    import hashlib

    import PIL
    import simplejpeg

    params = section_hash(
        p.model_copy(update={"workers": 1, "executor": "process", "address": None}),
        exclude={"output"},
    )
    code = f"{params}|{SAMPLE_CODE}|{PIL.__version__}|{simplejpeg.__version__}"
    return hashlib.sha256(code.encode()).hexdigest()[:16]


def build_manifest(
    splits: dict[str, SplitEntry],
    align_report: dict[str, Any],
    p: ShardParams,
    rejected: dict[str, int] | None = None,
    audio: AudioEntry | None = None,
) -> Manifest:
    """manifest.json (its fields: ``mmpipe.manifest.Manifest``), with the sample-count identity
    checked. ``rejected`` (ingest.image_check: header): pairs left out per split, so that pairs
    in = pairs sharded + pairs rejected; ``audio``: when the pairs carry clips.
    """
    per_split = align_report["pairs_per_split"]
    left_out = rejected or dict.fromkeys(SPLITS, 0)
    for split in SPLITS:
        copies = 1 + p.copies if split == "train" else 1
        want = (per_split[split] - left_out[split]) * copies
        got = splits[split].pairs
        check(got == want, f"{split}: {got} pairs written, {want} expected from align's report")
        n = splits[split].count
        check(n % copies == 0, f"{split}: {n} samples is not a multiple of {copies} copies")
    labelled = align_report.get("labelled_pairs", 0)
    status = "none" if not labelled else "all" if labelled == sum(per_split.values()) else "partial"
    optional = {"rejected_pairs_per_split": rejected, "audio": audio}  # in the file when given
    return Manifest(
        params_hash=output_params_hash(p),
        image_size=p.image_size,
        decode=p.decode,
        classes=list(align_report.get("classes", [])),
        labels=status,
        labelled_pairs_per_split=align_report.get("labelled_pairs_per_split", {}),
        label_separator=align_report.get("label_separator"),
        multi_label_pairs=align_report.get("multi_label_pairs", 0),
        unknown_label_pairs_per_split=align_report.get("unknown_label_pairs_per_split", {}),
        splits=splits,
        align_report_pairs_per_split=per_split,
        **{k: v for k, v in optional.items() if v is not None},
    )


def audio_manifest(pairs: pq.ParquetFile) -> AudioEntry:
    """The manifest's ``audio`` entry: the member format and the pairs with a clip per split."""
    from mmpipe.audio import SAMPLE_RATE

    per_split = dict.fromkeys(SPLITS, 0)
    for batch in pairs.iter_batches(batch_size=4096, columns=["split", "audio_path"]):
        for split in batch.column("split").filter(pc.is_valid(batch.column("audio_path"))):
            per_split[split.as_py()] += 1
    return AudioEntry(member="flac", sample_rate=SAMPLE_RATE, pairs_with_audio_per_split=per_split)


def run_shard(
    align_dir: Path,
    ingest_dir: Path,
    p: ShardParams,
    out_dir: Path,
    previous: Path | None = None,
) -> dict[str, Any]:
    """Write {split}-NNNNNN.tar + members.parquet + manifest.json into out_dir; return a report.

    ``out_dir`` should be new or empty (the driver's staging directory): shards of an earlier
    run with other names would stay beside the new ones. ``previous`` (the committed output)
    makes the run incremental: its shards whose pairs are all unchanged are reused as they are
    (hard-linked), the rest is encoded (mmpipe.incremental).

    Only deterministic files go to out_dir (timings are in the returned report and the log), so
    re-running with the same inputs leaves DVC's hash of the directory unchanged.
    """
    start = time.perf_counter()
    align_dir, ingest_dir, out_dir = Path(align_dir), Path(ingest_dir), Path(out_dir)
    use_system_arrow_allocator(IMAGE_MMAP_THRESHOLD)  # photos' buffers stay in the heap
    _pipelines(p)  # bad augment specs fail here, before any work
    pairs, align_report, root = open_pairs(align_dir, ingest_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reuse = plan_reuse(previous, output_params_hash(p), pairs, p.copies)
    if previous is not None:
        link_shards(reuse, Path(previous), out_dir)
    header, strict = header_checked(ingest_dir)
    rejects = RejectsWriter(out_dir / REJECTS, strict) if header else None
    try:
        splits, new = write_splits(
            pairs, p, root, out_dir, align_dir / "pairs.parquet", reuse, rejects
        )
    finally:
        if rejects is not None:
            rejects.close()
    rejected = rejects.per_split if rejects is not None else None
    audio = audio_manifest(pairs) if "audio_path" in pairs.schema_arrow.names else None
    manifest = build_manifest(splits, align_report, p, rejected, audio)
    write_manifest(manifest, out_dir)
    seconds = time.perf_counter() - start
    samples = sum(s.count for s in splits.values())
    report = {
        "pairs": pairs.metadata.num_rows,
        "samples": samples,
        "samples_per_split": {s: e.count for s, e in splits.items()},
        "shards": sum(len(e.shards) for e in splits.values()),
        "bytes": sum(sh.bytes or 0 for e in splits.values() for sh in e.shards),
        "params_hash": manifest.params_hash,
        "labels": manifest.labels,
        "new_samples": new,
        "rejected_pairs": sum((rejected or {}).values()),
        "reused_shards": reuse.n_shards,
        "workers": p.workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(samples / max(seconds, 1e-9), 1),
    }
    log.info("shard: %d new samples, %d shards reused", new, reuse.n_shards)
    if report["rejected_pairs"]:
        log.warning(
            "shard: %d pairs left out, their image cannot be decoded (%s): %d pairs = %d sharded"
            " + %d rejected",
            report["rejected_pairs"],
            out_dir / REJECTS,
            report["pairs"],
            report["pairs"] - report["rejected_pairs"],
            report["rejected_pairs"],
        )
    log.info(
        "shard: %d samples in %d shards, %.1fs (%.0f images/s, %d workers)",
        samples,
        report["shards"],
        seconds,
        report["images_per_second"],
        p.workers,
    )
    return report
