"""Stage `ingest`: read a source, validate every image and caption, write the records tables.

Sources: ``synthetic`` (generated into ``out_dir/source`` and read back through the folder
reader), ``folder`` (root + captions .csv/.jsonl/.parquet) and ``coco`` (captions JSON +
images dir). Outputs, written into ``out_dir`` (the stage driver's staging directory, switched
in whole: mmpipe.commit): records.parquet (accepted
captions), images.parquet (accepted images), rejects.jsonl (every rejected record, with file,
line and reason; codes in ``REJECT_REASONS``), report.json (counts; no timings, so DVC sees the
same file for the same data).

Memory stays flat in the number of records: captions are read as a stream and written to a
Parquet work file in row groups, images are validated in a pool and streamed to a second work
file, and only compact arrays cross the whole set: the paths to validate (one Arrow string
array), then 16-byte keys (mmpipe.keys) of the referenced paths, of each image's sha256 (for
duplicates) and of the validated paths with each one's image_id and outcome (33 bytes per
image), all sorted once and searched by binary search, never rebuilt per batch.

Decisions worth knowing:
- Images seen = every file under the image tree with an image-like extension (hidden files and
  directories skipped) + every existing file a caption references. Unreferenced images are
  validated too; align reports them as orphans.
- A caption is accepted only with an accepted image: one whose file is missing is rejected
  ``missing_image``, one whose image was rejected ``image_rejected`` (the detail names the
  image's reason). A caption of an exact duplicate keeps the kept copy's ``image_id``.
- The format comes from the content, not the name: a PNG named .jpg is accepted with format
  PNG. Decodable images of a format outside ``ingest.extensions`` are ``unsupported_format``.
- With ``ingest.image_check: header`` (the default) the pixels are not decoded here (shard
  decodes each image once and rejects the pairs of one it cannot decode; curate first, when its
  hashing or scorer decodes); only a JPEG/PNG without its end marker near the end of the file
  (a truncated download) is still decoded in full, and rejected. With ``decode`` every image is
  decoded: JPEGs at 1/8 scale (Pillow ``draft``: DCT-domain scaling); libjpeg still decodes the
  whole entropy-coded stream, so truncation and corruption are caught as in a full decode.
- Exact duplicates (same sha256): the first in *record order* is kept (captions file order;
  unreferenced files after, in path order); the others are rejected ``duplicate`` naming it.
- Captions with control characters (C0/C1, DEL; tab, CR and LF are whitespace) are rejected
  ``invalid_text``: a NUL or an escape sequence is a broken export, not text to train on.
- ``line`` is the physical 1-based line of the row's start (CSV header = line 1; JSONL line),
  the 1-based row for Parquet, the 1-based annotation index for COCO. Reject ``file`` paths are
  relative to the root, so outputs do not depend on where the data lives.
- Image paths (``images.parquet`` ``rel_path``) are relative to the data root; report.json's
  ``data_root`` says where that root is (``resolve_data_root``).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from mmpipe.audio import AUDIO_REJECT_REASONS, ingest_audio
from mmpipe.config import IngestParams, section_hash
from mmpipe.errors import InputError, ValidationFailed, check
from mmpipe.faults import fault_point
from mmpipe.incremental import CheckCache, write_check_cache
from mmpipe.incremental import check_settings as digest_settings
from mmpipe.io import (
    LABEL_SEPARATOR_KEY,
    atomic_path,
    iter_batches,
    read_json,
    release_arrow_memory,
    resolve_inside,
    scratch_dir,
    table_schema,
    use_system_arrow_allocator,
    write_json_atomic,
)
from mmpipe.keys import KeyIndex, arrow_keys, string_keys
from mmpipe.parallel import dask_map, ordered_map, process_pool
from mmpipe.progress import tqdm  # a bar on a terminal, a log line every minute elsewhere

log = logging.getLogger(__name__)

# Every reason a record can be rejected for: code -> meaning (docs/reject-reasons.md lists them).
REJECT_REASONS = {
    # images
    "zero_bytes": "image file is empty",
    "not_an_image": "the file's content is not an image format Pillow knows",
    "corrupt": "the image cannot be decoded (bad header or data), or cannot be read",
    "truncated": "the image data ends early",
    "unsupported_format": "a decodable image whose format is not among ingest.extensions' formats",
    "bad_extension": "file extension not in ingest.extensions (e.g. a .tif in the image tree)",
    "too_small": "shorter side below ingest.min_side (after EXIF orientation)",
    "too_many_pixels": "width x height above ingest.max_pixels (decompression-bomb guard)",
    "duplicate": "same bytes as an earlier image (duplicate_of names the kept one)",
    "path_escapes_root": "the path leaves the data root (.., absolute, or a symlink out)",
    # captions
    "bad_json": "a JSONL line that is not valid JSON",
    "bad_row": "a row without the image/caption fields, of the wrong shape or field count",
    "invalid_utf8": "a field is not valid UTF-8",
    "invalid_text": "caption or label holds control characters (NUL, ESC, other C0/C1, DEL)",
    "empty_caption": "caption empty after whitespace normalisation",
    "caption_too_long": "caption longer than ingest.max_caption_chars",
    "unknown_image_id": "COCO annotation whose image_id is not in images[]",
    "missing_image": "the caption's image file does not exist",
    "image_rejected": "the caption's image was rejected (the detail gives its reason)",
    # audio clips (kind "audio"; also zero_bytes, corrupt, bad_extension, path_escapes_root)
    **AUDIO_REJECT_REASONS,
}

# Files with these extensions are scanned even when not accepted, so the user learns (as
# bad_extension) that e.g. their .tif files were skipped.
IMAGE_LIKE = {".gif", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jp2", ".jfif", ".jpe", ".ico"}
# Pillow format names that a given extension's format may legitimately decode as.
FORMAT_ALIASES = {"JPEG": {"JPEG", "MPO"}}
MISSING = "missing"  # a referenced file that does not exist: not an image seen
# Rows handled as Python objects at once (row groups of the work files too), and rows per
# vectorised Arrow lookup. Small and fixed, so memory per step does not depend on N.
BATCH = 2048
LOOKUP_BATCH = 8192
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse)
SWAPS_SIDES = {5, 6, 7, 8}

TEXT_JOIN = " [SEP] "  # joins ingest.text_columns when no text_template is given
RECORD_SCHEMA = table_schema(
    "caption_id", "caption", "image_ref", "image_id", "label", "source",
    ("line", pa.int64()), "meta",
)  # fmt: skip
_SIZE = (("width", pa.int64()), ("height", pa.int64()), "format", ("bytes", pa.int64()))
IMAGE_SCHEMA = table_schema("image_id", "rel_path", "sha256", *_SIZE)
# work files (inside out_dir, removed at the end)
DRAFT_SCHEMA = table_schema(("line", pa.int64()), "image_ref", "rel", "caption", "label", "meta")
RESULT_SCHEMA = table_schema("rel_path", "reason", "detail", "sha256", *_SIZE)


@dataclass
class RawCaption:
    """One caption row as read, before validation; ``error`` set when the reader rejected it."""

    line: int
    image_ref: str | None
    caption: Any
    label: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: tuple[str, str] | None = None


@dataclass
class Source:
    """What a reader returns: the root, the captions file, its rows (a stream), the image tree."""

    name: str
    root: Path
    captions_file: Path
    rows: Iterator[RawCaption]
    image_tree: Path
    params: IngestParams  # what the rows are read with (the synthetic source sets its columns)


class Rejects:
    """Streams rejects to ``fh`` and counts them; raises ValidationFailed at the first in strict."""

    def __init__(self, fh: IO[str], strict: bool) -> None:
        self.fh, self.strict = fh, strict
        self.counts: Counter[tuple[str, str]] = Counter()

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
        check(reason in REJECT_REASONS, f"undocumented reject reason {reason!r}")
        if self.strict:
            where = f"{file}:{line}" if line is not None else file
            raise ValidationFailed(f"{where}: rejected {kind} ({reason}): {detail}")
        row = {
            "kind": kind,
            "file": file,
            "line": line,
            "reason": reason,
            "detail": detail,
            "duplicate_of": duplicate_of,
        }
        self.fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
        self.counts[(kind, reason)] += 1

    def by_reason(self, kind: str) -> dict[str, int]:
        """Count of rejects of ``kind`` per reason code."""
        return dict(sorted((r, n) for (k, r), n in self.counts.items() if k == kind))


# --------------------------------------------------------------------------- entry point


def run_ingest(p: IngestParams, out_dir: Path, check_cache: Path | None = None) -> dict[str, Any]:
    """Read ``p.source``, validate it, write records/images/rejects/report into ``out_dir``.

    Returns the report (as written to report.json) plus ``seconds``, ``images_per_second`` and
    ``image_checks`` (checked vs reused), which are for the log and MLflow only. ``check_cache``:
    a file of earlier image checks by content (``incremental.CheckCache``), read and rewritten:
    images whose bytes were checked before (same settings) are not decoded again.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_system_arrow_allocator()
    _resolve_cached.cache_clear()  # files may have moved since the last run in this process
    source, generated = open_source(p, out_dir)
    fault_point("ingest:source-ready")
    with (
        atomic_path(out_dir / "rejects.jsonl") as rejects_path,
        rejects_path.open("w", encoding="utf-8") as fh,
        scratch_dir(out_dir / ".work") as work,
    ):
        rejects = Rejects(fh, p.strict)
        n_rows = _write_drafts(source, source.params, rejects, work / "drafts.parquet")
        refs, referenced = _distinct_refs(work / "drafts.parquet")
        candidates = _candidates(source, refs, referenced, p)
        del refs, referenced
        checks = _validate_images(candidates, source.root, p, work / "results.parquet", check_cache)
        del candidates
        release_arrow_memory()
        index = _finish_images(work / "results.parquet", rejects, out_dir / "images.parquet")
        fault_point("ingest:images-written")
        release_arrow_memory()
        accepted = _finish_captions(
            work / "drafts.parquet", index, source, rejects, out_dir / "records.parquet",
            records_schema(source.params),
        )  # fmt: skip
        audio = _audio(source, rejects, out_dir / "records.parquet")
        fh.flush()
    report = _report(source, p, rejects, index, n_rows, accepted)
    if audio is not None:
        report["audio"] = {**audio, "by_reason": rejects.by_reason("audio")}
    report["data_root"] = _data_root_record(p, source.root, out_dir)
    report["image_check"] = p.image_check  # "header": shard rejects what it cannot decode
    report["strict"] = p.strict  # ... or, strict, fails at the first image it cannot decode
    if generated is not None:
        report["synthetic"] = {k: generated[k] for k in ("n_images", "n_captions")}
    fault_point("ingest:records-written")
    write_json_atomic(out_dir / "report.json", report)
    seconds = time.perf_counter() - start
    log.info(
        "ingest %s: images %s, captions %s in %.1fs",
        source.name,
        report["images"],
        report["captions"],
        seconds,
    )
    timings = {
        "seconds": round(seconds, 3),
        "images_per_second": round(report["images"]["seen"] / max(seconds, 1e-9), 1),
        "image_checks": checks,
    }
    return {**report, **timings}


def open_source(p: IngestParams, out_dir: Path) -> tuple[Source, dict[str, Any] | None]:
    """The configured source's reader (generating the synthetic data first when asked)."""
    if p.source == "folder":
        return read_folder(p), None
    if p.source == "coco":
        return read_coco(p), None
    from mmpipe.synthetic import generate

    generated = generate(out_dir / "source", p.synthetic, workers=p.workers)
    folder_p = p.model_copy(update={"root": str(out_dir / "source"), **synthetic_columns(p)})
    return read_folder(folder_p, name="synthetic"), generated


def synthetic_columns(p: IngestParams) -> dict[str, Any]:
    """How the folder reader reads the generated captions.csv (mmpipe/synthetic.py's columns)."""
    from mmpipe.synthetic import LABEL_SEPARATOR

    columns: dict[str, Any] = {
        "captions": "captions.csv", "image_column": "image", "caption_column": "caption",
        "label_column": "label", "text_columns": [], "question_column": None,
        "answer_column": None,
        "label_separator": LABEL_SEPARATOR if p.synthetic.label == "tags" else None,
    }  # fmt: skip
    if p.synthetic.questions:
        columns.update(question_column="question", answer_column="answer", label_separator=None)
    if p.synthetic.audio:
        columns["audio_column"] = "audio"
    return columns


def _audio(source: Source, rejects: Rejects, records: Path) -> dict[str, int] | None:
    """With ``audio_column``: validate the rows' clips, add ``audio_path`` to the records."""
    p = source.params
    if not p.audio_column:
        return None

    def reject(rel: str, reason: str, detail: str) -> None:
        rejects.add("audio", rel, None, reason, detail)

    counts = ingest_audio(records, source.root, p.audio_column, p.audio, reject)
    check(counts["rejected"] == sum(rejects.by_reason("audio").values()), f"audio: {counts}")
    return counts


def _data_root_record(p: IngestParams, root: Path, out_dir: Path) -> str:
    """Where the data root is, as report.json records it (see ``resolve_data_root``).

    synthetic: "source" (inside the ingest dir). A root configured as an absolute path stays
    absolute (the data lives there whatever the project does); a relative one is stored relative
    to the ingest dir, so the project can move as a whole. Neither embeds the ingest dir itself.
    """
    if p.source == "synthetic":
        return "source"
    if p.root is not None and Path(p.root).expanduser().is_absolute():
        return str(root)
    return os.path.relpath(root, out_dir.resolve())


def resolve_data_root(ingest_dir: str | Path) -> Path:
    """The data root that ingest's relative image paths are relative to (for align and shard)."""
    ingest_dir = Path(ingest_dir)
    report_path = ingest_dir / "report.json"
    if not report_path.is_file():
        raise InputError(f"{report_path}: not found; run `mmpipe ingest` first")
    recorded = read_json(report_path).get("data_root")
    if not isinstance(recorded, str):
        raise InputError(f"{report_path}: no data_root; run `mmpipe ingest` again")
    root = ingest_dir / recorded  # an absolute recorded root replaces ingest_dir
    if not root.is_dir():
        raise InputError(
            f"data root {root} (from {report_path}) is not a directory: the data moved since "
            "ingest; re-run `mmpipe ingest`"
        )
    return root


def _report(
    source: Source,
    p: IngestParams,
    rejects: Rejects,
    index: ImageIndex,
    n_rows: int,
    accepted: dict[str, int],
) -> dict[str, Any]:
    counts = {
        "images": {
            "seen": index.seen,
            "accepted": index.accepted,
            "rejected": index.seen - index.accepted,
            "by_reason": rejects.by_reason("image"),
        },
        "captions": {
            "seen": n_rows,
            "accepted": accepted["captions"],
            "rejected": n_rows - accepted["captions"],
            "by_reason": rejects.by_reason("caption"),
        },
    }
    # The accounting invariant of the stage: every item seen is either accepted or rejected.
    for kind, c in counts.items():
        n_rejects = sum(c["by_reason"].values())
        ok = c["seen"] == c["accepted"] + c["rejected"] == c["accepted"] + n_rejects
        check(ok, f"{kind}: seen != accepted + rejected: {c}")
    return {
        "source": source.name,
        **counts,
        "labelled_captions": accepted["labelled"],
        "params_hash": section_hash(p),
    }


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
    rows = (_to_raw(r, line, p) for line, r in reader(path, p))
    return Source(name, root, path, rows, root, p)


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


def text_columns(p: IngestParams) -> list[str]:
    """The columns the text input is made of: the question (VQA), text_columns, or the caption."""
    if p.question_column:
        return [p.question_column]
    return list(p.text_columns) or [p.caption_column]


def label_column(p: IngestParams) -> str:
    """The column holding the label: the answer (VQA) or label_column."""
    return p.answer_column or p.label_column


def _missing_columns(path: Path, found: list[str], p: IngestParams) -> None:
    missing = [c for c in (p.image_column, *text_columns(p)) if c not in found]
    if missing:
        raise InputError(
            f"{path}: required column(s) {missing} missing; found columns {found} "
            f"(set ingest.image_column / ingest.caption_column / ingest.text_columns / "
            f"ingest.question_column)"
        )


def _read_csv(path: Path, p: IngestParams) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path}: empty CSV, expected a header row") from None
        except csv.Error as exc:
            raise InputError(f"{path}:1: unreadable CSV header: {exc}") from None
        if _has_surrogates(*header):
            raise InputError(f"{path}:1: header is not valid UTF-8")
        _missing_columns(path, header, p)
        line = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise InputError(f"{path}:{line}: unreadable CSV row: {exc}") from None
            if fields:  # blank lines are not rows
                if len(fields) != len(header):
                    detail = f"expected {len(header)} fields, got {len(fields)}"
                    yield line, {"__error__": ("bad_row", detail)}
                else:
                    yield line, dict(zip(header, fields, strict=True))
            line = reader.line_num + 1


def _read_jsonl(path: Path, p: IngestParams) -> Iterator[tuple[int, dict[str, Any]]]:
    """One object per line; a line that is not JSON is a ``bad_json`` reject, not a failure."""
    keys: set[str] = set()
    n_objects = 0
    with path.open("rb") as fh:
        for line, raw in enumerate(fh, 1):
            if line == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield line, {"__error__": ("invalid_utf8", f"byte {exc.start}: {exc.reason}")}
                continue
            except json.JSONDecodeError as exc:
                detail = f"not valid JSON ({exc.msg} at column {exc.colno}): {raw[:80]!r}"
                yield line, {"__error__": ("bad_json", detail)}
                continue
            if not isinstance(obj, dict):
                yield line, {"__error__": ("bad_row", f"expected an object, got {obj!r:.60}")}
                continue
            if len(keys) < 1000:  # bounded: only to name the columns in an error
                keys.update(obj)
            n_objects += 1
            yield line, obj
    if n_objects and not {p.image_column, *text_columns(p)} & keys:
        _missing_columns(path, sorted(keys), p)


def _read_parquet(path: Path, p: IngestParams) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable Parquet file: {exc}") from None
    _missing_columns(path, pf.schema_arrow.names, p)
    line = 0
    for batch in iter_batches(pf, BATCH):
        for row in batch.to_pylist():
            line += 1
            yield line, row


def _to_raw(row: dict[str, Any], line: int, p: IngestParams) -> RawCaption:
    """Map a parsed row to a RawCaption: image, text and label columns, the rest into meta."""
    if "__error__" in row:
        return RawCaption(line, None, None, error=row["__error__"])
    texts, label = text_columns(p), label_column(p)
    known = (p.image_column, *texts, label)
    meta = {k: v for k, v in row.items() if k not in known}
    image = row.get(p.image_column)
    missing = [c for c in (p.image_column, *texts) if c not in row]
    if missing:
        error = ("bad_row", f"missing {', '.join(map(repr, missing))}")
        return RawCaption(line, image, None, meta=meta, error=error)
    if len(texts) == 1:
        return RawCaption(line, image, row[texts[0]], row.get(label), meta)
    empty = [c for c in texts if not isinstance(row[c], str) or not row[c].strip()]
    if empty:
        error = ("empty_caption", f"text column(s) {', '.join(map(repr, empty))} empty")
        return RawCaption(line, image, None, meta=meta, error=error)
    return RawCaption(line, image, join_texts(row, texts, p.text_template), row.get(label), meta)


def join_texts(row: dict[str, Any], columns: list[str], template: str | None) -> str:
    """A row's text fields as one text: ``template``'s ``{column}`` placeholders filled in, or
    the fields joined by TEXT_JOIN. Plain substitution: a template cannot reach attributes as
    ``str.format`` could."""
    if template is None:
        return TEXT_JOIN.join(str(row[c]) for c in columns)
    return re.sub(r"\{(\w+)\}", lambda m: str(row.get(m.group(1), m.group(0))), template)


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
    images_dir = root / p.images_dir
    if resolve_inside(root, p.images_dir) is None or not images_dir.is_dir():
        raise InputError(
            f"COCO images directory not found: {images_dir} (ingest.images_dir, relative to root)"
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
    rows = (_coco_row(i, ann, files, labels, p) for i, ann in enumerate(doc["annotations"], 1))
    return Source("coco", root, path, rows, images_dir, p)


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
        detail = f"annotation {ann.get('id')!r}: image_id {ann['image_id']!r} not in images[]"
        return RawCaption(line, None, None, meta=meta, error=("unknown_image_id", detail))
    parts = file_name.replace("\\", "/").split("/")
    if os.path.isabs(file_name) or ".." in parts:
        detail = f"file_name {file_name!r} leaves images_dir {p.images_dir!r}"
        return RawCaption(line, None, None, meta=meta, error=("path_escapes_root", detail))
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


# C0 controls except tab/LF/CR (whitespace, collapsed by normalise_text), DEL, and C1 controls
_CONTROL = {c for c in range(0x20) if chr(c) not in "\t\n\r"} | set(range(0x7F, 0xA0))
_CONTROL_TABLE = dict.fromkeys(_CONTROL, "")


def has_control_chars(text: str) -> bool:
    """True when ``text`` holds a control character other than tab, LF or CR."""
    return len(text.translate(_CONTROL_TABLE)) != len(text)


def normalise_text(text: str) -> str:
    """NFC unicode, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def _check_caption(row: RawCaption, p: IngestParams) -> tuple[dict[str, Any] | None, tuple]:
    """Validate one row: (draft, ()) when accepted, (None, (reason, detail)) when rejected."""
    if row.error is not None:
        return None, row.error
    meta_values = list(row.meta.values()) + list(row.meta)
    if _has_surrogates(row.image_ref, row.caption, row.label, *meta_values):
        return None, ("invalid_utf8", "a field is not valid UTF-8")
    if not isinstance(row.caption, str) or not isinstance(row.image_ref, str) or not row.image_ref:
        detail = (
            f"image {row.image_ref!r:.80} / caption {row.caption!r:.80}: expected non-empty strings"
        )
        return None, ("bad_row", detail)
    label = None if _is_missing(row.label) or row.label == "" else str(row.label)
    for name, text in (("caption", row.caption), ("label", label)):
        if text is not None and has_control_chars(text):
            return None, ("invalid_text", f"{name} {text!r:.80} holds control characters")
    caption = normalise_text(row.caption)
    if not caption:
        return None, ("empty_caption", f"caption of {row.image_ref!r} is empty")
    if len(caption) > p.max_caption_chars:
        return None, ("caption_too_long", f"{len(caption)} chars > {p.max_caption_chars}")
    return {
        "line": row.line,
        "image_ref": row.image_ref,
        "caption": caption,
        "label": None if label is None else canonical_label(normalise_text(label), p),
        "meta": json.dumps(row.meta, sort_keys=True, ensure_ascii=False, default=str),
    }, ()


def canonical_label(label: str, p: IngestParams) -> str | None:
    """One spelling per label: a VQA answer normalised as the VQA evaluation does; several labels
    (``label_separator``) stripped, deduplicated and sorted, so "dog| cat|dog" is "cat|dog"."""
    if p.answer_column:
        from mmpipe.metrics import vqa_normalize

        label = vqa_normalize(label)
    if p.label_separator:
        parts = sorted({part.strip() for part in label.split(p.label_separator)} - {""})
        label = p.label_separator.join(parts)
    return label or None


def records_schema(p: IngestParams) -> pa.Schema:
    """records.parquet's schema; its metadata tells align how to split multi-labels."""
    if not p.label_separator:
        return RECORD_SCHEMA
    return RECORD_SCHEMA.with_metadata({LABEL_SEPARATOR_KEY: p.label_separator})


# Consecutive captions usually share an image; a small cache saves the disk lookups without
# growing with the data set.
_resolve_cached = functools.lru_cache(maxsize=1024)(resolve_inside)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _write_drafts(source: Source, p: IngestParams, rejects: Rejects, dest: Path) -> int:
    """Pass 1: check every caption row, stream accepted drafts to ``dest``; rows seen."""
    file = source.captions_file.relative_to(source.root).as_posix()
    n_rows, buf = 0, []
    with pq.ParquetWriter(dest, DRAFT_SCHEMA) as writer:
        for row in source.rows:
            n_rows += 1
            draft, error = _check_caption(row, p)
            if draft is not None:
                draft["rel"] = _relative_ref(source.root, draft["image_ref"])
                if draft["rel"] is None:
                    detail = f"{draft['image_ref']!r} leaves the root"
                    draft, error = None, ("path_escapes_root", detail)
            if draft is None:
                rejects.add("caption", file, row.line, *error)
                continue
            buf.append(draft)
            if len(buf) >= BATCH:
                writer.write_table(pa.Table.from_pylist(buf, schema=DRAFT_SCHEMA))
                buf = []
        writer.write_table(pa.Table.from_pylist(buf, schema=DRAFT_SCHEMA))
    return n_rows


def _relative_ref(root: Path, ref: str) -> str | None:
    """The image path relative to the root (what every output stores), None if it escapes.

    An absolute path is accepted when it is under the root as written; stored relative to it.
    """
    if _resolve_cached(root, ref) is None:
        return None
    rel = os.path.normpath(os.path.relpath(ref, root) if os.path.isabs(ref) else ref)
    if rel == ".." or rel.startswith(".." + os.sep):
        return None  # inside only through a symlinked alias of the root: ambiguous, refuse
    return rel.replace(os.sep, "/")


def _distinct_refs(drafts: Path) -> tuple[pa.Array, KeyIndex]:
    """The distinct image paths the captions reference, in first-reference order, and the keys
    of every referenced path (to tell referenced tree files apart).

    Drafts are in line order, so the first row of a path is its first reference. 16 bytes per
    caption of keys span the set; the paths themselves are picked up in a second pass.
    """
    pf = pq.ParquetFile(drafts)
    keys = np.empty((pf.metadata.num_rows, 2), dtype=np.uint64)
    offset = 0
    for batch in iter_batches(pf, LOOKUP_BATCH, ["rel"]):
        keys[offset : offset + batch.num_rows] = arrow_keys(batch.column("rel"))
        offset += batch.num_rows
    index = KeyIndex.build(keys)
    del keys
    first = np.ones(len(index), dtype=bool)
    first[index.repeated()] = False
    refs, offset = [], 0
    for batch in iter_batches(pf, LOOKUP_BATCH, ["rel"]):
        mask = pa.array(first[offset : offset + batch.num_rows])
        refs.append(batch.column("rel").filter(mask))
        offset += batch.num_rows
    return _concat_strings(refs), index


def _concat_strings(chunks: list[pa.Array]) -> pa.Array:
    """One string array of ``chunks`` (an empty one when there are none)."""
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


# --------------------------------------------------------------------------- images


def _walk_files(top: Path) -> Iterator[str]:
    """Paths (relative to ``top``) of the non-hidden files under ``top``, lazily.

    os.walk lists a whole directory before yielding it: a flat folder of 10M images would be a
    10M-string list. scandir yields one entry at a time. Symlinked dirs are not followed.
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(top / rel_dir if rel_dir else top) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                else:
                    yield rel


def _tree_files(src: Source, p: IngestParams, referenced: KeyIndex) -> pa.Array:
    """Relative paths of the image-like files under the image tree that no caption references,
    sorted (Arrow: compact; referenced ones are dropped batch by batch, never all held)."""
    like = tuple({e.lower() for e in p.extensions} | IMAGE_LIKE)
    prefix = os.path.relpath(src.image_tree, src.root).replace(os.sep, "/")
    chunks, names = [], []

    def flush() -> None:
        known = referenced.find(string_keys(names)) >= 0
        unreferenced = [n for n, k in zip(names, known, strict=True) if not k]
        chunks.append(pa.array(unreferenced, pa.string()))
        names.clear()

    for rel in _walk_files(src.image_tree):
        if rel.lower().endswith(like):
            names.append(rel if prefix == "." else f"{prefix}/{rel}")
            if len(names) >= BATCH:
                flush()
    flush()
    files = _concat_strings(chunks)
    return files.take(pc.sort_indices(files))


def _candidates(src: Source, refs: pa.Array, referenced: KeyIndex, p: IngestParams) -> pa.Array:
    """Paths to validate, in record order: referenced ones, then unreferenced tree files."""
    return pa.concat_arrays([refs, _tree_files(src, p, referenced)])


_CHECK: dict[str, Any] = {}  # per process: root and limits of the image check


def _init_check(
    root: str,
    extensions: list[str],
    max_pixels: int,
    min_side: int,
    decode: bool = True,
    cache: str | None = None,
    settings: str = "",
) -> None:
    """Pool initializer (also called inline): the image check's constant settings, and the
    contents checked before (``cache``, keys only: a hit is filled in by ``_write_results``)."""
    Image.init()
    registered = Image.registered_extensions()
    formats = set()
    for ext in extensions:
        fmt = registered.get(ext.lower())
        if fmt is not None:
            formats |= FORMAT_ALIASES.get(fmt, {fmt})
    _CHECK.update(
        root=root,
        extensions={e.lower() for e in extensions},
        formats=formats,
        max_pixels=max_pixels,
        min_side=min_side,
        decode=decode,
        cache=CheckCache.load(cache, settings, keys_only=True) if cache else None,
    )


def check_settings(p: IngestParams) -> str:
    """What an image check's outcome depends on besides the bytes (``CheckCache``'s key)."""
    import PIL

    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    extensions = sorted(e.lower() for e in p.extensions)
    return digest_settings(extensions=extensions, max_pixels=p.max_pixels, min_side=p.min_side,
                           image_check=p.image_check, pillow=PIL.__version__,
                           code=code)  # fmt: skip


def _validate_images(
    candidates: pa.Array, root: Path, p: IngestParams, dest: Path, cache: Path | None = None
) -> dict[str, int]:
    """Validate every candidate (in a pool, ordered) and stream the results to ``dest``; with a
    ``cache``, reuse its checks and rewrite it. Returns ``{"checked", "reused"}``."""
    settings = check_settings(p)
    init = (str(root), p.extensions, p.max_pixels, p.min_side, p.image_check == "decode",
            str(cache) if cache else None, settings)  # fmt: skip
    known = CheckCache.load(cache, settings) if cache else CheckCache()
    n = len(candidates)
    rels = (r for i in range(0, n, BATCH) for r in candidates.slice(i, BATCH).to_pylist())
    bar = dict(total=n, desc="ingest images", unit="img", disable=None)
    with pq.ParquetWriter(dest, RESULT_SCHEMA) as writer:
        if p.executor == "dask":
            on = dict(address=p.address, workers=p.workers, chunksize=16)
            results = dask_map(validate_image, rels, **on, initializer=_init_check, initargs=init)
            reused = _write_results(writer, tqdm(results, **bar), known)
        elif p.workers > 1 and n > 32:
            with process_pool(p.workers, initializer=_init_check, initargs=init) as pool:
                results = ordered_map(pool, validate_image, rels, chunksize=16, depth=4 * p.workers)
                reused = _write_results(writer, tqdm(results, **bar), known)
        else:
            _init_check(*init)
            reused = _write_results(writer, tqdm(map(validate_image, rels), **bar), known)
            _CHECK["cache"] = None  # this process's copy of the keys: not kept past the stage
    if cache is not None:
        write_check_cache(dest, cache, settings)
    log.info("ingest image checks: %d checked, %d reused from earlier runs (same bytes)",
             n - reused, reused)  # fmt: skip
    return {"checked": n - reused, "reused": reused}


def _write_results(
    writer: pq.ParquetWriter, results: Iterator[dict[str, Any]], known: CheckCache
) -> int:
    """Stream the results to ``writer``, a cache hit's outcome filled in; returns the hits."""
    buf, hits = [], 0
    for result in results:
        if result.pop("cached", False):
            result.update(known.outcome(result["sha256"]))
            hits += 1
        buf.append(result)
        if len(buf) >= BATCH:
            writer.write_table(pa.Table.from_pylist(buf, schema=RESULT_SCHEMA))
            buf = []
    writer.write_table(pa.Table.from_pylist(buf, schema=RESULT_SCHEMA))
    return hits


def validate_image(rel: str) -> dict[str, Any]:
    """Pool entry point: validate one file (settings from ``_init_check``), never raise."""
    out: dict[str, Any] = {"rel_path": rel, "reason": None, "detail": None, "bytes": 0}
    resolved = resolve_inside(_CHECK["root"], rel)
    if resolved is None:
        out.update(reason="path_escapes_root", detail=f"{rel} resolves outside the data root")
        return out
    if not resolved.is_file():
        out.update(reason=MISSING, detail=f"{rel} does not exist")
        return out
    ext = os.path.splitext(rel)[1].lower()
    if ext not in _CHECK["extensions"]:
        out.update(reason="bad_extension", detail=f"extension {ext!r} not in ingest.extensions")
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
    out["sha256"] = hashlib.sha256(data).hexdigest()
    if _CHECK.get("cache") is not None and _CHECK["cache"].has(out["sha256"]):
        out["cached"] = True  # the same bytes were checked before: the writer fills it in
        return out
    reason, detail, info = check_image_bytes(
        data, _CHECK["formats"], _CHECK["max_pixels"], _CHECK["min_side"], _CHECK["decode"]
    )
    out.update(reason=reason, detail=detail or None, **info)
    return out


def check_image_bytes(
    data: bytes, formats: set[str], max_pixels: int, min_side: int, decode: bool = True
) -> tuple[str | None, str, dict[str, Any]]:
    """Decode fully (JPEG at 1/8 scale); return (reason or None, detail, {width, height, format}).

    ``decode=False`` (``ingest.image_check: header``): the same checks without decoding the
    pixels, unless the file lacks its format's end marker (``ends_early``).
    Pillow's own pixel limit is switched off here: the header size is checked against
    ``max_pixels`` before any pixel is decoded, and the message states the configured limit.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return _decode_checks(data, formats, max_pixels, min_side, decode)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# End markers, looked for in the file's last END_WINDOW bytes: a camera or editor may append a
# little after them (a JPEG's trailer, padding), a truncated download has none.
END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
END_WINDOW = 4096


def ends_early(data: bytes, fmt: str) -> bool:
    """True when a JPEG/PNG has no end marker near its end (it cannot be whole)."""
    marker = END_MARKERS.get(fmt)
    return marker is not None and marker not in data[-END_WINDOW:]


def _decode_checks(
    data: bytes, formats: set[str], max_pixels: int, min_side: int, decode: bool = True
) -> tuple[str | None, str, dict[str, Any]]:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return "not_an_image", "Pillow cannot identify the format", {}
    except Exception as exc:  # noqa: BLE001 - any decoder failure on open is a corrupt header
        return "corrupt", f"{type(exc).__name__}: {exc}", {}
    with im:
        fmt = im.format or "?"
        if fmt not in formats:
            return "unsupported_format", f"{fmt} data; accepted: {sorted(formats)}", {"format": fmt}
        w, h = im.size
        if w * h > max_pixels:  # header check before any pixel is decoded
            detail = f"{w}x{h} = {w * h:,} pixels > ingest.max_pixels {max_pixels:,}"
            return "too_many_pixels", detail, {"format": fmt}
        try:
            orientation = (im.getexif() if decode else _header_exif(im)).get(0x0112)
            if decode or ends_early(data, fmt):
                _decode_small(im, fmt)
        except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
            reason = "truncated" if "truncat" in str(exc).lower() else "corrupt"
            return reason, f"{type(exc).__name__}: {exc}", {"format": fmt}
    if orientation in SWAPS_SIDES:
        w, h = h, w
    info = {"width": w, "height": h, "format": fmt}
    if min(w, h) < min_side:
        return "too_small", f"{w}x{h}: shorter side < {min_side}", info
    return None, "", info


def _header_exif(im: Image.Image) -> Image.Exif | dict[int, Any]:
    """EXIF read without decoding: a PNG's ``getexif()`` decodes the whole image to look for an
    eXIf chunk after the pixels; this reads only one placed before them (as the spec asks)."""
    return im.getexif() if im.format != "PNG" or "exif" in im.info else {}


def _decode_small(im: Image.Image, fmt: str) -> None:
    """Decode every byte of ``im`` (a JPEG at 1/8 scale) and convert a pixel as shard will."""
    if fmt in FORMAT_ALIASES["JPEG"]:
        im.draft(im.mode, (1, 1))  # DCT-domain 1/8 scale: every byte is still decoded
    im.load()
    im.crop((0, 0, 1, 1)).convert("RGB")


# An image's outcome as a code: 0 usable (accepted, or a duplicate of an accepted one), 1 the
# file does not exist, then the image reject reasons.
OUTCOMES: tuple[str | None, ...] = (None, MISSING, *REJECT_REASONS)


@dataclass
class ImageIndex:
    """What captions need to know about each validated path: 33 bytes per path, sorted keys.

    ``keys`` finds a path's row; ``ids`` is the row's image_id (the first 8 bytes of the
    content's sha256; the kept copy's for a duplicate) and ``outcomes`` its OUTCOMES code.
    """

    keys: KeyIndex
    ids: np.ndarray  # uint64, meaningful where outcomes == 0
    outcomes: np.ndarray  # int8
    seen: int
    accepted: int


def _duplicates(results: Path) -> dict[int, int]:
    """{position of a duplicate: position of its kept copy} over the valid results.

    The first 16 bytes of each sha256 are the key (streamed; 16 + 8 bytes per image span the set).
    """
    pf = pq.ParquetFile(results)
    where = np.empty(pf.metadata.num_rows, dtype=np.int64)  # filled up to `count`
    keys = np.empty((pf.metadata.num_rows, 2), dtype=np.uint64)
    count = offset = 0
    for batch in iter_batches(pf, LOOKUP_BATCH, ["reason", "sha256"]):
        valid = pc.and_(pc.is_null(batch.column("reason")), pc.is_valid(batch.column("sha256")))
        at = np.flatnonzero(valid.to_numpy(zero_copy_only=False))
        where[count : count + len(at)] = at + offset
        hexes = pc.utf8_slice_codeunits(batch.column("sha256").filter(valid), 0, 32)
        keys[count : count + len(at)] = _hex_to_keys(hexes).view("<u8").reshape(-1, 2)
        count += len(at)
        offset += batch.num_rows
    where, keys = where[:count], keys[:count]
    index = KeyIndex.build(keys)
    dups = index.repeated()
    firsts = index.find(keys[dups])
    return dict(zip(where[dups].tolist(), where[firsts].tolist(), strict=True))


_HEX = np.zeros(256, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def _hex_to_keys(hexes: pa.Array) -> np.ndarray:
    """32 lower-case hex chars per row -> one 16-byte key per row (no Python object per row)."""
    n = len(hexes)
    if n == 0:
        return np.zeros(0, dtype="V16")
    start = hexes.offset * 32
    chars = np.frombuffer(hexes.buffers()[2], np.uint8, count=n * 32, offset=start).reshape(n, 32)
    nibbles = _HEX[chars]
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]  # (n, 16) uint8
    return np.ascontiguousarray(packed).view("V16").ravel()


def _finish_images(results: Path, rejects: Rejects, dest: Path) -> ImageIndex:
    """Mark duplicates, write images.parquet and the image rejects; the index for captions."""
    kept_of = _duplicates(results)
    wanted = set(kept_of.values())
    kept_rel: dict[int, str] = {}  # paths of kept copies, picked up as the stream passes them
    pf = pq.ParquetFile(results)
    n = pf.metadata.num_rows
    keys = np.empty((n, 2), dtype=np.uint64)
    ids = np.zeros(n, dtype=np.uint64)
    outcomes = np.zeros(n, dtype=np.int8)
    seen = accepted = offset = 0
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, IMAGE_SCHEMA) as writer:
        for batch in iter_batches(pf, BATCH):
            keep = []
            rows = batch.to_pylist()
            for i, r in enumerate(rows, offset):
                image_id = r["sha256"][:16] if r["sha256"] and r["reason"] is None else None
                seen += r["reason"] != MISSING
                if i in wanted:
                    kept_rel[i] = r["rel_path"]
                if r["reason"] not in (None, MISSING):
                    rejects.add("image", r["rel_path"], None, r["reason"], r["detail"] or "")
                elif i in kept_of:
                    first = kept_rel[kept_of[i]]
                    detail = f"same bytes as {first}, which is kept (first in record order)"
                    rejects.add("image", r["rel_path"], None, "duplicate", detail, first)
                elif r["reason"] is None:
                    keep.append({**r, "image_id": image_id})
                outcomes[i] = OUTCOMES.index(r["reason"])
                ids[i] = int(image_id, 16) if image_id is not None else 0
            keys[offset : offset + len(rows)] = string_keys(r["rel_path"] for r in rows)
            offset += batch.num_rows
            accepted += len(keep)
            writer.write_table(pa.Table.from_pylist(keep, schema=IMAGE_SCHEMA))
    return ImageIndex(KeyIndex.build(keys), ids, outcomes, seen, accepted)


def _finish_captions(
    drafts: Path,
    index: ImageIndex,
    src: Source,
    rejects: Rejects,
    dest: Path,
    schema: pa.Schema = RECORD_SCHEMA,
) -> dict[str, int]:
    """Pass 2: give each draft its image's outcome; write records.parquet, reject the rest."""
    file = src.captions_file.relative_to(src.root).as_posix()
    counts = {"captions": 0, "labelled": 0}
    with atomic_path(dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for batch in iter_batches(pq.ParquetFile(drafts), LOOKUP_BATCH):
            at = index.keys.find(arrow_keys(batch.column("rel")))
            check(bool((at >= 0).all()), "a caption's image path was not validated")
            ids, outcomes = index.ids[at].tolist(), index.outcomes[at].tolist()
            for start in range(0, batch.num_rows, BATCH):
                rows = []
                for d, image_id, outcome in zip(
                    batch.slice(start, BATCH).to_pylist(),
                    ids[start : start + BATCH],
                    outcomes[start : start + BATCH],
                    strict=True,
                ):
                    if outcome:
                        reason = _image_reason(d["rel"], OUTCOMES[outcome])
                        rejects.add("caption", file, d["line"], *reason)
                        continue
                    rows.append(_record(d, f"{image_id:016x}", src.name))
                counts["captions"] += len(rows)
                counts["labelled"] += sum(r["label"] is not None for r in rows)
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return counts


def _image_reason(rel: str, reason: str | None) -> tuple[str, str]:
    if reason == MISSING:
        return "missing_image", f"image file {rel} does not exist"
    return "image_rejected", f"image {rel} was rejected: {reason}"


def _record(draft: dict[str, Any], image_id: str, source: str) -> dict[str, Any]:
    """A records.parquet row; caption_id is stable for the same (image_ref, caption, line)."""
    key = f"{draft['image_ref']}\x00{draft['caption']}\x00{draft['line']}"
    return {
        "caption_id": hashlib.sha256(key.encode("utf-8")).hexdigest()[:16],
        "caption": draft["caption"],
        "image_ref": draft["image_ref"],
        "image_id": image_id,
        "label": draft["label"],
        "source": source,
        "line": draft["line"],
        "meta": draft["meta"],
    }
