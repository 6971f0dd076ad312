"""Stage `ingest`: read a source, validate every image and caption, write the records tables.

Sources: ``synthetic`` (generated into ``out_dir/source`` and read back through the folder
reader), ``folder`` (root + captions .csv/.jsonl/.parquet) and ``coco`` (captions JSON +
images dir). Outputs (see CONTRACT.md): records.parquet, images.parquet, rejects.jsonl,
report.json, each written atomically.

Decisions worth knowing:
- Images seen = every file under the image tree with an image-like extension (hidden files and
  directories skipped) + every existing file a caption references. Unreferenced images are
  validated too; align reports them as orphans.
- Extension/format disagreement (PNG bytes named .jpg) is REJECTED as ``extension_mismatch``:
  downstream readers dispatch on the extension, and a misnamed file usually means a broken export.
  MPO (multi-picture JPEG from cameras) counts as JPEG.
- A caption whose image file is missing is accepted with ``image_id`` null (align makes it an
  orphan); one whose path leaves the root is rejected ``path_escapes_root``.
- Exact duplicates (same sha256): the first in sorted relative-path order is canonical; the others
  are rejected ``duplicate`` and their captions get the canonical ``image_id``.
- ``line`` is the physical 1-based line of the row's start (CSV header = line 1; JSONL line),
  the 1-based row for Parquet, the 1-based annotation index for COCO. Reject ``file`` paths are
  relative to the root, so outputs do not depend on where the data lives.
- COCO annotations whose image_id is not in ``images`` keep ``image_ref`` = "image_id:<id>" and
  a null ``image_id``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import os
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from mmpipe.config import IngestParams, section_hash
from mmpipe.errors import InputError, ValidationFailed
from mmpipe.io import atomic_path, resolve_inside, sha256_bytes, write_json_atomic
from mmpipe.io import write_jsonl_atomic as _write_jsonl
from mmpipe.parallel import process_pool

log = logging.getLogger(__name__)

# Files with these extensions are scanned even when not accepted, so the user learns (as
# bad_extension) that e.g. their .tif files were skipped.
IMAGE_LIKE = {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".jfif", ".jpe", ".ico"}
# Pillow format names that a given extension's format may legitimately decode as.
FORMAT_ALIASES = {"JPEG": {"JPEG", "MPO"}}

RECORD_SCHEMA = pa.schema(
    [
        ("caption_id", pa.string()),
        ("caption", pa.string()),
        ("image_ref", pa.string()),
        ("image_id", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("meta", pa.string()),
    ]
)
IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("rel_path", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("format", pa.string()),
        ("bytes", pa.int64()),
    ]
)


@dataclass
class RawCaption:
    """One caption row as read, before validation; ``error`` set when the reader rejected it."""

    line: int
    image_ref: str | None
    caption: Any
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None
    resolvable: bool = True  # False for COCO annotations of unknown images


@dataclass
class Source:
    """What a reader returns: the root, the captions file, its rows, where to scan for images."""

    name: str
    root: Path
    captions_file: Path
    rows: list[RawCaption]
    image_tree: Path


class Rejects:
    """Collects rejects and counts; raises ValidationFailed at the first one in strict mode."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        kind: str,
        file: str,
        line: int | None,
        reason: str,
        detail: str,
        duplicate_of: str | None = None,
    ) -> None:
        """Record one rejected image or caption."""
        row = {
            "kind": kind,
            "file": file,
            "line": line,
            "reason": reason,
            "detail": detail,
            "duplicate_of": duplicate_of,
        }
        if self.strict:
            where = f"{file}:{line}" if line is not None else file
            raise ValidationFailed(f"{where}: rejected {kind} ({reason}): {detail}")
        self.rows.append(row)

    def by_reason(self, kind: str) -> dict[str, int]:
        """Count of rejects of ``kind`` per reason code."""
        return dict(sorted(Counter(r["reason"] for r in self.rows if r["kind"] == kind).items()))


# --------------------------------------------------------------------------- entry point


def run_ingest(p: IngestParams, out_dir: Path) -> dict[str, Any]:
    """Read ``p.source``, validate it, write records/images/rejects/report into ``out_dir``."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    _resolve_cached.cache_clear()  # files may have moved since the last run in this process
    generated = None
    if p.source == "synthetic":
        from mmpipe.synthetic import generate

        generated = generate(out_dir / "source", p.synthetic, workers=p.workers)
        folder_p = p.model_copy(
            update={
                "root": str(out_dir / "source"),
                "captions": "captions.csv",
                "image_column": "image",
                "caption_column": "caption",
                "label_column": "label",
            }
        )
        source = read_folder(folder_p, name="synthetic")
    elif p.source == "folder":
        source = read_folder(p)
    else:
        source = read_coco(p)
    rejects = Rejects(p.strict)
    captions = [_check_caption(row, source, p, rejects) for row in source.rows]
    refs = {c["rel"] for c in captions if c is not None and c["rel"] is not None}
    t0 = time.perf_counter()
    images = _validate_images(_image_candidates(source, refs, p), source.root, p, rejects)
    validate_seconds = time.perf_counter() - t0
    records = _build_records(captions, images, source.name)
    report = _report(source, p, rejects, images, records, len(source.rows))
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["validate_seconds"] = round(validate_seconds, 3)
    seen = report["images"]["seen"]
    report["images_per_second"] = round(seen / validate_seconds, 1) if validate_seconds else 0.0
    if generated is not None:
        report["synthetic"] = generated
    _write_outputs(out_dir, records, images, rejects, report)
    log.info("ingest %s: %s", source.name, {k: report[k] for k in ("images", "captions")})
    return report


def _report(
    source: Source,
    p: IngestParams,
    rejects: Rejects,
    images: list[dict[str, Any]],
    records: list[dict[str, Any]],
    n_rows: int,
) -> dict[str, Any]:
    accepted_images = sum(1 for im in images if im["accepted"])
    counts = {
        "images": {
            "seen": len(images),
            "accepted": accepted_images,
            "rejected": len(images) - accepted_images,
            "by_reason": rejects.by_reason("image"),
        },
        "captions": {
            "seen": n_rows,
            "accepted": len(records),
            "rejected": n_rows - len(records),
            "by_reason": rejects.by_reason("caption"),
        },
    }
    # The accounting invariant of the stage: every item seen is either accepted or rejected.
    for kind, c in counts.items():
        n_rejects = sum(c["by_reason"].values())
        assert c["seen"] == c["accepted"] + c["rejected"] == c["accepted"] + n_rejects, (kind, c)
    return {"source": source.name, **counts, "params_hash": section_hash(p)}


def _write_outputs(
    out_dir: Path,
    records: list[dict[str, Any]],
    images: list[dict[str, Any]],
    rejects: Rejects,
    report: dict[str, Any],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{k: im[k] for k in IMAGE_SCHEMA.names} for im in images if im["accepted"]]
    _write_parquet(out_dir / "records.parquet", records, RECORD_SCHEMA)
    _write_parquet(out_dir / "images.parquet", rows, IMAGE_SCHEMA)
    _write_jsonl(out_dir / "rejects.jsonl", rejects.rows)
    write_json_atomic(out_dir / "report.json", report)


def _write_parquet(dest: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)


# --------------------------------------------------------------------------- readers


def read_folder(p: IngestParams, name: str = "folder") -> Source:
    """Read a folder source: ``root`` + a captions .csv/.jsonl/.parquet file."""
    root = _require_root(p)
    path = root / p.captions
    if not path.is_file():
        raise InputError(f"captions file not found: {path} (ingest.captions, relative to root)")
    readers = {".csv": _read_csv, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise InputError(
            f"{path}: unsupported captions file extension {path.suffix!r}; expected one of "
            f"{sorted(readers)} for source 'folder' (.json is read by source 'coco')"
        )
    records = reader(path, p)
    return Source(name, root, path, [_to_raw(r, line, p) for line, r in records], root)


def _require_root(p: IngestParams) -> Path:
    if p.root is None:
        raise InputError(f"ingest.root is required for source {p.source!r}")
    root = Path(p.root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"data root not found or not a directory: {root} (ingest.root)")
    return root


def _decode(data: bytes) -> str:
    """UTF-8 (BOM stripped); undecodable bytes become lone surrogates, caught per row later."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")


def _missing_columns(path: Path, found: list[str], p: IngestParams) -> None:
    missing = [c for c in (p.image_column, p.caption_column) if c not in found]
    if missing:
        raise InputError(
            f"{path}: required column(s) {missing} missing; found columns {found} "
            f"(set ingest.image_column / ingest.caption_column)"
        )


def _read_csv(path: Path, p: IngestParams) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.reader(io.StringIO(_decode(path.read_bytes()), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(f"{path}: empty CSV, expected a header row") from None
    except csv.Error as exc:
        raise InputError(f"{path}:1: unreadable CSV header: {exc}") from None
    if _has_surrogates(*header):
        raise InputError(f"{path}:1: header is not valid UTF-8")
    _missing_columns(path, header, p)
    rows: list[tuple[int, dict[str, Any]]] = []
    line = reader.line_num + 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise InputError(f"{path}:{line}: unreadable CSV row: {exc}") from None
        if fields:  # blank lines are not rows
            if len(fields) != len(header):
                detail = f"expected {len(header)} fields, got {len(fields)}"
                rows.append((line, {"__error__": ("bad_row", detail)}))
            else:
                rows.append((line, dict(zip(header, fields, strict=True))))
        line = reader.line_num + 1
    return rows


def _read_jsonl(path: Path, p: IngestParams) -> list[tuple[int, dict[str, Any]]]:
    rows: list[tuple[int, dict[str, Any]]] = []
    keys: set[str] = set()
    for line, raw in enumerate(path.read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append((line, {"__error__": ("invalid_utf8", f"byte {exc.start}: {exc.reason}")}))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{path}:{line}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "expected one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            rows.append((line, {"__error__": ("bad_row", f"expected an object, got {obj!r:.60}")}))
            continue
        keys.update(obj)
        rows.append((line, obj))
    if rows and keys:
        _missing_columns(path, sorted(keys), p)
    return rows


def _read_parquet(path: Path, p: IngestParams) -> list[tuple[int, dict[str, Any]]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    _missing_columns(path, table.column_names, p)
    return [(i, row) for i, row in enumerate(table.to_pylist(), 1)]


def _to_raw(row: dict[str, Any], line: int, p: IngestParams) -> RawCaption:
    """Map a parsed row to a RawCaption: the three known columns, the rest into meta."""
    if "__error__" in row:
        return RawCaption(line, None, None, error=row["__error__"])
    known = (p.image_column, p.caption_column, p.label_column)
    meta = {k: v for k, v in row.items() if k not in known}
    raw = RawCaption(
        line, row.get(p.image_column), row.get(p.caption_column), row.get(p.label_column), meta
    )
    if p.image_column not in row or p.caption_column not in row:
        raw.error = ("bad_row", f"missing {p.image_column!r} or {p.caption_column!r}")
    return raw


def read_coco(p: IngestParams) -> Source:
    """Read a COCO-captions source: ``root/captions`` JSON + ``root/images_dir``."""
    root = _require_root(p)
    path = root / p.captions
    if not path.is_file():
        raise InputError(f"COCO captions file not found: {path} (ingest.captions)")
    if path.suffix.lower() != ".json":
        raise InputError(
            f"{path}: unsupported captions extension for source 'coco'; expected .json"
        )
    try:
        doc = json.loads(_decode(path.read_bytes()))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(k), list) for k in ("images", "annotations")
    ):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise InputError(f"{path}: expected keys 'images' and 'annotations' (lists); found {found}")
    files = _coco_files(path, doc["images"])
    labels = _read_labels(root, p.labels_file) if p.labels_file else {}
    rows = [_coco_row(i, ann, files, labels, p) for i, ann in enumerate(doc["annotations"], 1)]
    return Source("coco", root, path, rows, root / p.images_dir)


def _coco_files(path: Path, images: list[Any]) -> dict[Any, str]:
    files: dict[Any, str] = {}
    for i, im in enumerate(images, 1):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise InputError(f"{path}: images[{i - 1}] needs 'id' and a string 'file_name'")
        files[im["id"]] = im["file_name"]
    return files


def _coco_row(
    line: int, ann: Any, files: dict[Any, str], labels: dict[str, str], p: IngestParams
) -> RawCaption:
    if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
        return RawCaption(line, None, None, error=("bad_row", "annotation needs image_id, caption"))
    meta = {"coco_image_id": ann["image_id"], "coco_annotation_id": ann.get("id")}
    file_name = files.get(ann["image_id"])
    if file_name is None:
        return RawCaption(
            line, f"image_id:{ann['image_id']}", ann["caption"], None, meta, resolvable=False
        )
    ref = f"{p.images_dir.rstrip('/')}/{file_name}"
    return RawCaption(line, ref, ann["caption"], labels.get(file_name), meta)


def _read_labels(root: Path, name: str) -> dict[str, str]:
    """Per-image labels from a CSV with columns file_name,label."""
    path = root / name
    if not path.is_file():
        raise InputError(f"labels file not found: {path} (ingest.labels_file)")
    reader = csv.DictReader(io.StringIO(_decode(path.read_bytes()), newline=""))
    found = reader.fieldnames or []
    if "file_name" not in found or "label" not in found:
        raise InputError(f"{path}: expected columns file_name,label; found columns {found}")
    return {row["file_name"]: row["label"] for row in reader if row.get("file_name")}


# --------------------------------------------------------------------------- captions


def _has_surrogates(*values: Any) -> bool:
    """True when a string holds lone surrogates (undecodable bytes or a JSON \\ud800 escape)."""
    for v in values:
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


def normalise_text(text: str) -> str:
    """NFC unicode, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _check_caption(
    row: RawCaption, src: Source, p: IngestParams, rejects: Rejects
) -> dict[str, Any] | None:
    """Validate one row; return the record draft (with the image's relative path) or None."""
    file = src.captions_file.relative_to(src.root).as_posix()

    def reject(reason: str, detail: str) -> None:
        rejects.add("caption", file, row.line, reason, detail)

    meta_values = list(row.meta.values()) + list(row.meta)
    if row.error is not None:
        return reject(*row.error)
    if _has_surrogates(row.image_ref, row.caption, row.label, *meta_values):
        return reject("invalid_utf8", "a field is not valid UTF-8")
    if not isinstance(row.caption, str) or not isinstance(row.image_ref, str) or not row.image_ref:
        return reject(
            "bad_row",
            f"image {row.image_ref!r:.80} / caption {row.caption!r:.80}: "
            "expected non-empty strings",
        )
    caption = normalise_text(row.caption)
    if not caption:
        return reject("empty_caption", f"caption of {row.image_ref!r} is empty")
    if len(caption) > p.max_caption_chars:
        return reject("caption_too_long", f"{len(caption)} chars > {p.max_caption_chars}")
    rel = None
    if row.resolvable:
        if _resolve_cached(src.root, row.image_ref) is None:
            return reject("path_escapes_root", f"image path {row.image_ref!r} leaves {src.root}")
        rel = os.path.normpath(row.image_ref).replace(os.sep, "/")
    label = None if _is_missing(row.label) else normalise_text(str(row.label)) or None
    meta = json.dumps(row.meta, sort_keys=True, ensure_ascii=False, default=str)
    return {
        "line": row.line,
        "image_ref": row.image_ref,
        "caption": caption,
        "label": label,
        "meta": meta,
        "rel": rel,
    }


# Captions repeat their image's path (several captions per image); resolving hits the disk.
_resolve_cached = functools.lru_cache(maxsize=1 << 16)(resolve_inside)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _build_records(
    captions: list[dict[str, Any] | None], images: list[dict[str, Any]], source: str
) -> list[dict[str, Any]]:
    """Attach image ids (canonical for duplicates) and stable caption ids."""
    ids = {im["rel_path"]: im["image_id"] for im in images if im["image_id"] is not None}
    records = []
    for c in captions:
        if c is None:
            continue
        key = f"{c['image_ref']}\x00{c['caption']}\x00{c['line']}"
        records.append(
            {
                "caption_id": sha256_bytes(key.encode("utf-8"))[:16],
                "caption": c["caption"],
                "image_ref": c["image_ref"],
                "image_id": ids.get(c["rel"]),
                "label": c["label"],
                "source": source,
                "line": c["line"],
                "meta": c["meta"],
            }
        )
    return records


# --------------------------------------------------------------------------- images


def _image_candidates(src: Source, refs: set[str], p: IngestParams) -> list[str]:
    """Relative paths to validate: image-like files in the tree + referenced existing files."""
    like = {e.lower() for e in p.extensions} | IMAGE_LIKE
    found = set()
    if src.image_tree.is_dir():
        for dirpath, dirnames, filenames in os.walk(src.image_tree):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for fn in filenames:
                if not fn.startswith(".") and os.path.splitext(fn)[1].lower() in like:
                    found.add(Path(dirpath, fn).relative_to(src.root).as_posix())
    found.update(r for r in refs if (src.root / r).is_file())
    return sorted(found)


def _validate_images(
    rels: list[str], root: Path, p: IngestParams, rejects: Rejects
) -> list[dict[str, Any]]:
    """Validate in a pool (ordered), then mark exact duplicates; returns one dict per file."""
    jobs = [(rel, str(root), p.extensions, p.max_pixels, p.min_side) for rel in rels]
    bar = dict(total=len(jobs), desc="ingest images", unit="img", disable=None)
    if p.workers > 1 and len(jobs) > 32:
        with process_pool(p.workers) as pool:
            results = list(tqdm(pool.imap(_validate_job, jobs, chunksize=16), **bar))
    else:
        results = list(tqdm(map(_validate_job, jobs), **bar))
    return _dedupe(results, rejects)


def _dedupe(results: list[dict[str, Any]], rejects: Rejects) -> list[dict[str, Any]]:
    canonical: dict[str, dict[str, Any]] = {}
    for im in results:  # sorted by rel path: the first of a group is canonical
        if im["reason"] is None and im["sha256"] in canonical:
            first = canonical[im["sha256"]]
            im["reason"], im["detail"] = "duplicate", f"same bytes as {first['rel_path']}"
            im["image_id"] = first["image_id"]
            rejects.add("image", im["rel_path"], None, "duplicate", im["detail"], first["rel_path"])
        elif im["reason"] is None:
            canonical[im["sha256"]] = im
        else:
            im["image_id"] = None
            rejects.add("image", im["rel_path"], None, im["reason"], im["detail"])
        im["accepted"] = im["reason"] is None
    return results


def _validate_job(job: tuple[str, str, list[str], int, int]) -> dict[str, Any]:
    """Pool entry point: validate one file, never raise."""
    rel, root, extensions, max_pixels, min_side = job
    out: dict[str, Any] = {
        "rel_path": rel,
        "path": None,
        "reason": None,
        "detail": "",
        "image_id": None,
        "sha256": None,
        "bytes": 0,
        "width": 0,
        "height": 0,
        "format": None,
    }
    resolved = resolve_inside(root, rel)
    if resolved is None:
        out.update(reason="path_escapes_root", detail=f"{rel} resolves outside {root}")
        return out
    out["path"] = str(resolved)
    ext = os.path.splitext(rel)[1].lower()
    if ext not in {e.lower() for e in extensions}:
        out.update(reason="bad_extension", detail=f"extension {ext!r} not in {extensions}")
        return out
    try:
        data = resolved.read_bytes()
    except OSError as exc:  # unreadable (permissions, I/O error): nothing downstream can use it
        out.update(reason="corrupt", detail=f"cannot read: {exc}")
        return out
    out["bytes"] = len(data)
    if not data:
        out.update(reason="zero_bytes", detail="file is empty")
        return out
    out["sha256"] = sha256_bytes(data)
    out["image_id"] = out["sha256"][:16]
    reason, detail, info = check_image_bytes(data, ext, max_pixels, min_side)
    out.update(reason=reason, detail=detail, **info)
    return out


def check_image_bytes(
    data: bytes, ext: str, max_pixels: int, min_side: int
) -> tuple[str | None, str, dict[str, Any]]:
    """Decode fully; return (reason or None, detail, {width, height, format})."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow warns above this, raises above twice this
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode_checks(data, ext, max_pixels, min_side)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return "too_many_pixels", str(exc), {}
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _decode_checks(
    data: bytes, ext: str, max_pixels: int, min_side: int
) -> tuple[str | None, str, dict[str, Any]]:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return "not_an_image", "Pillow cannot identify the format", {}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure on open is a corrupt header
        return "corrupt", f"{type(exc).__name__}: {exc}", {}
    with im:
        fmt = im.format or "?"
        expected = Image.registered_extensions().get(ext)
        if expected is None or fmt not in FORMAT_ALIASES.get(expected, {expected}):
            return "extension_mismatch", f"{fmt} data named {ext}", {"format": fmt}
        w, h = im.size
        if w * h > max_pixels:  # header check before any pixel is decoded
            return "too_many_pixels", f"{w}x{h} = {w * h} > {max_pixels}", {"format": fmt}
        try:
            im.load()
            upright = ImageOps.exif_transpose(im)
            upright.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
            reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
            return reason, f"{type(exc).__name__}: {exc}", {"format": fmt}
        w, h = upright.size
    info = {"width": w, "height": h, "format": fmt}
    if min(w, h) < min_side:
        return "too_small", f"{w}x{h}: shorter side < {min_side}", info
    return None, "", info
