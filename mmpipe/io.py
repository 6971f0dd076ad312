"""Small file helpers every stage uses: atomic writes, hashing, JSON/JSONL, path containment."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

# Temp files and dirs of every stage carry this suffix, so the next run can find the leftovers of
# an interrupted one. A live writer holds an flock on its temp (a file, or `.lock` inside a dir);
# the kernel drops it when the process dies, so "lockable" means "its writer is gone". The grace
# period covers the instant between creating a temp and locking it.
TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
STALE_GRACE_SECONDS = 60.0


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

    On error the temp file is removed, so an interrupted stage never leaves a half-written output;
    after a kill, ``remove_stale_temps`` in the next run removes it. The file gets the mode a plain
    open() would give (umask respected), not mkstemp's 0600.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=TMP_SUFFIX, dir=dest.parent)
    tmp_path = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # ours while we write: no other run may remove it
        os.fchmod(fd, output_mode())
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        os.close(fd)
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def locked_temp_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A new temp dir in ``parent``, locked while in use and removed afterwards (even on error)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=parent))
    fd = os.open(path / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.chmod(path, output_mode(directory=True))
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def _is_stale(path: Path, now: float) -> bool:
    """True when no live process holds ``path``'s lock and it is past the grace period."""
    try:
        if now - path.lstat().st_mtime < STALE_GRACE_SECONDS:
            return False
        target = path / LOCK_NAME if path.is_dir() else path
        fd = os.open(target, os.O_RDONLY)
    except OSError:
        return path.is_dir()  # a dir without its lock file was abandoned before locking
    try:
        return try_flock(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | Path) -> list[str]:
    """Remove the temp files/dirs that interrupted runs left in ``directory``; never a live run's.

    Returns the names removed (for the log).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    now, removed = time.time(), []
    for entry in directory.iterdir():
        if not (entry.name.startswith(".") and entry.name.endswith(TMP_SUFFIX)):
            continue
        if _is_stale(entry, now):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def write_bytes_atomic(dest: str | Path, data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(dest: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON atomically (stable diffs, DVC-friendly)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(dest, text.encode("utf-8"))


def write_jsonl_atomic(dest: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line atomically; returns the number of rows."""
    n = 0
    with atomic_path(dest) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
            n += 1
    return n


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


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


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
    """Hand memory that Arrow freed back to the OS (its allocator keeps it otherwise).

    Called between the phases of the streaming stages: each phase's peak then does not stack on
    the memory the previous one freed but kept.
    """
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def use_system_arrow_allocator() -> None:
    """Route Arrow's allocations through malloc for this process (the data stages call it).

    Arrow's default mimalloc pool keeps freed pages: on a 200k-image ingest, RSS rose 60-80 MiB
    per phase while Arrow held < 10 MiB (measured, benchmarks/README.md); glibc returns them.
    """
    import pyarrow as pa

    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


# records.parquet's schema metadata: the separator of multi-labels (ingest writes, align reads)
LABEL_SEPARATOR_KEY = "mmpipe.label_separator"


def table_schema(*columns: str | tuple[str, Any]) -> Any:
    """An Arrow schema from column names (string columns) and ``(name, type)`` pairs."""
    import pyarrow as pa

    return pa.schema([(c, pa.string()) if isinstance(c, str) else c for c in columns])
