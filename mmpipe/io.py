"""Small file helpers every stage uses: atomic writes, hashing, JSON/JSONL, path containment."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temp files of atomic writes carry this suffix, so that a later run can find what a killed one
# left (``remove_temps``). Under the project lock (mmpipe.lock) no other writer can be live.
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def output_mode(directory: bool = False) -> int:
    """Permissions a plain open()/mkdir() would give: 0666 / 0777 less the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def try_flock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another holder has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed over ``dest`` (atomic on POSIX).

    On error the temp file is removed; after a kill, ``remove_temps`` removes it. The file gets
    the mode a plain open() would give (umask respected), not mkstemp's 0600.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent)
    tmp_path = Path(tmp)
    try:
        os.fchmod(fd, output_mode())
        os.close(fd)
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_dir(path: str | Path) -> Iterator[Path]:
    """A work directory a stage removes when done (even on error).

    Stages create it inside their staging directory (mmpipe.commit), so a kill -9 leaves it only
    there, and the next run removes the whole staging directory.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_temps(directory: str | Path) -> list[str]:
    """Remove the temp files that killed atomic writes left in ``directory``; their names.

    Only call it under the project lock: then no live writer can own one.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def link_or_copy(src: str | Path, dest: str | Path) -> None:
    """Hard-link ``src`` as ``dest`` (no copy on one filesystem), else copy it."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (stable diffs, DVC-friendly)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(dest, text.encode("utf-8"))


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None: JSON has no NaN (Python's
    json writes it anyway, and other parsers reject the document)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.lru_cache(maxsize=4096)
def _real_dir(path: str) -> str:
    """realpath of a directory, cached: a data root holds many files in few directories."""
    return os.path.realpath(path)


def resolve_inside(root: str | Path, relative: str) -> Path | None:
    """Resolve ``relative`` under ``root``; None when it escapes the root (``..``, absolute, symlink).

    Same answer as ``(root / relative).resolve()`` checked against ``root.resolve()``, but the
    directories are resolved once per process (cached) and only the last component is looked
    at per file: resolving every path in full was 20 % of ingest (profiled, benchmarks/README.md).
    """
    root_real = _real_dir(os.fspath(root))
    joined = os.path.join(root_real, os.fspath(relative))
    parent, name = os.path.split(joined)
    if name in ("", ".", ".."):
        candidate = os.path.realpath(joined)
    else:
        candidate = os.path.join(_real_dir(parent), name)
        if os.path.islink(candidate):
            candidate = os.path.realpath(candidate)
    if not candidate.startswith(root_real.rstrip(os.sep) + os.sep):
        return None
    return Path(candidate)


def release_arrow_memory() -> None:
    """Hand memory that Arrow and malloc freed back to the OS (their allocators keep it otherwise).

    Called between the phases of the streaming stages: each phase's peak then does not stack on
    the memory the previous one freed but kept.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def open_parquet(path: str | Path, columns: tuple[str, ...], made_by: str) -> Any:
    """A stage's parquet input as a ``pyarrow.parquet.ParquetFile``, checked: it exists, reads
    and has ``columns``; else an InputError naming the file and the stage (``made_by``) to run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmpipe.errors import InputError

    if not Path(path).is_file():
        raise InputError(f"{path}: {made_by} output not found; run `mmpipe {made_by}` first")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(
            f"{path}: unreadable parquet ({exc}); run `mmpipe {made_by}` again"
        ) from None
    missing = [c for c in columns if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)}; run `mmpipe {made_by}` again"
        )
    return pf


def iter_batches(pf: Any, batch_size: int, columns: list[str] | None = None) -> Iterator[Any]:
    """The rows of a ``pyarrow.parquet.ParquetFile`` in batches, one row group at a time.

    pyarrow's whole-file ``iter_batches`` keeps ~90 bytes per row read until it ends (measured:
    +16 MiB of peak RSS over 200k rows of two columns); a reader per row group frees them. A
    batch never spans two row groups, so batches can be shorter than ``batch_size``.
    """
    for group in range(pf.metadata.num_row_groups):
        yield from pf.iter_batches(
            batch_size=batch_size, row_groups=[group], columns=columns, use_threads=False
        )


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
MMAP_THRESHOLD = 256 * 1024  # Arrow-heavy stages (ingest, curate, align): RSS follows live data
# shard: a photo's decoded and resized buffers (0.25-2 MiB) are reused from the heap instead of
# being mapped and unmapped per photo (600k page faults, 1.4 of 11 CPU s on 2,400 photos)
IMAGE_MMAP_THRESHOLD = 4 * 1024 * 1024
# torch work (train, evaluate): glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_
# THRESHOLD_MAX on 64-bit), the state a fresh process reaches after its first large frees
COMPUTE_MMAP_THRESHOLD = 32 * 1024 * 1024


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc through ctypes, or None (another libc: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only: raise AttributeError if absent
    except (OSError, AttributeError):
        return None
    return libc


def _set_mmap_threshold(threshold: int) -> None:
    """Fix glibc's mmap threshold (which ends its dynamic raising) and trim at twice it."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)


def use_system_arrow_allocator(mmap_threshold: int = MMAP_THRESHOLD) -> None:
    """Route Arrow's allocations through malloc for this process (the data stages call it), and
    keep malloc from holding freed buffers.

    Arrow's default mimalloc pool keeps freed pages: on a 200k-image ingest, RSS rose 60-80 MiB
    per phase while Arrow held < 10 MiB (measured, benchmarks/README.md); glibc returns them.
    glibc, though, raises its mmap threshold each time a large block is freed (up to 32 MiB), so
    later buffers of that size come from the heap, where a freed one in the middle is never
    returned: a fixed threshold keeps every buffer >= ``mmap_threshold`` in its own mapping,
    unmapped on free, and peak RSS follows the live data rather than the allocation history.
    Each such buffer is page-faulted in afresh, though: shard passes ``IMAGE_MMAP_THRESHOLD``,
    and torch work must not run under this setting (``use_compute_allocator``).
    """
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())
    _set_mmap_threshold(mmap_threshold)


def use_compute_allocator() -> None:
    """malloc for torch work (train, evaluate, a curate scorer): tensors up to 32 MiB reuse freed
    heap memory. Undoes a data stage's ``use_system_arrow_allocator`` in the same process
    (``mmpipe run``, the nightly flow): under its 256 KiB threshold every activation was mapped
    and page-faulted afresh at each step, and a training step cost 1.6x the CPU (measured:
    6.1M vs 0.7M page faults over 30 steps of the default model)."""
    _set_mmap_threshold(COMPUTE_MMAP_THRESHOLD)


# records.parquet's schema metadata: the separator of multi-labels (ingest writes, align reads)
LABEL_SEPARATOR_KEY = "mmpipe.label_separator"


def table_schema(*columns: str | tuple[str, Any]) -> Any:
    """An Arrow schema from column names (string columns) and ``(name, type)`` pairs."""
    import pyarrow as pa

    return pa.schema([(c, pa.string()) if isinstance(c, str) else c for c in columns])
