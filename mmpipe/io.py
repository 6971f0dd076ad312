"""Small file helpers every stage uses: atomic writes, hashing, JSON/JSONL, path containment."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; on success it is renamed over ``dest`` (atomic on POSIX).

    On error the temp file is removed, so an interrupted stage never leaves a half-written output.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
