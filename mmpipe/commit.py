"""Whole-stage atomic outputs: write a stage's output into a staging directory, switch it in at once.

    with staged_dir(Path("data/shards")) as staging:
        ...write every file of the new version into ``staging``...
    # data/shards now holds the new version; before this line it held the old one

A reader (the next stage, DVC, the flow's cache check) sees the previous version or the new one,
never a mix, whatever moment a kill -9 hits:

* The staging directory ``.<name>.staging-<host>-<pid>-<token>`` sits beside the output (same
  filesystem, so the switch is a rename) and is created with the umask's permissions.
* The switch is one ``renameat2(RENAME_EXCHANGE)`` on Linux: old and new trade places atomically,
  then the old version (now under the staging name) is deleted. Where the kernel or filesystem
  lacks it, two renames are used (old → ``.<name>.old-…``, staging → output); a kill between them
  leaves no output, which :func:`recover` undoes by putting the old version back.
* Leftovers of dead runs (staging and old directories whose process is gone) are removed by
  :func:`recover` at the start of the next run; a live run's staging directory is never touched.
* A full disk inside the block removes the staging directory and raises :class:`DiskFull`, one line
  naming the output and the space needed; the previous version stays in place.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from mmpipe.errors import MmpipeError
from mmpipe.faults import fault_point

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


class DiskFull(MmpipeError):
    """No space left while writing a stage's output; the previous output is intact."""


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _owner_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_dead_leftover(name: str, marker: str) -> bool:
    """True for ``.<out>.<marker>-<host>-<pid>-<token>`` of a process of this host that is gone.

    Another host's leftovers (a shared filesystem) are left alone: their liveness is unknowable here.
    """
    try:
        host, pid, _token = name.split(f".{marker}-", 1)[1].rsplit("-", 2)
    except (IndexError, ValueError):
        return False
    if host != _host() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not pid_alive(int(pid))


def _leftovers(out_dir: Path, marker: str) -> list[Path]:
    parent = out_dir.parent
    if not parent.is_dir():
        return []
    prefix = f".{out_dir.name}.{marker}-"
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefix))


def recover(out_dir: str | Path) -> None:
    """Undo what a killed run left beside ``out_dir``: restore an old version, drop dead staging."""
    out_dir = Path(out_dir)
    for old in _leftovers(out_dir, "old"):
        if not _is_dead_leftover(old.name, "old"):
            continue
        if not out_dir.exists():  # killed between the two renames of the fallback switch
            os.rename(old, out_dir)
            log.warning("%s: restored the previous version left by an interrupted run", out_dir)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for staging in _leftovers(out_dir, "staging"):
        if _is_dead_leftover(staging.name, "staging"):
            log.info("%s: removing %s left by an interrupted run", out_dir, staging.name)
            shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False if unsupported here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def switch_in(staging: Path, out_dir: Path) -> None:
    """Make ``staging`` the content of ``out_dir`` in one atomic step; the old version is deleted."""
    fault_point("commit:before-switch")
    if not out_dir.exists():
        os.rename(staging, out_dir)
    elif _exchange(staging, out_dir):
        fault_point("commit:after-switch")
        shutil.rmtree(staging, ignore_errors=True)  # holds the old version now
    else:
        old = out_dir.parent / f".{out_dir.name}.old-{_owner_tag()}-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
        fault_point("commit:between-renames")
        os.rename(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


def _size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _free(path: Path) -> int:
    for candidate in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(candidate).free
    return 0


def _disk_full(out_dir: Path, staging: Path) -> DiskFull:
    written = _size(staging)
    previous = _size(out_dir) if out_dir.exists() else 0
    need = max(written, previous)
    return DiskFull(
        f"{out_dir}: no space left on device after writing {_mib(written)} of the new version "
        f"({_mib(_free(out_dir.parent))} free on that filesystem now); the stage needs at least "
        f"{_mib(need)}{' (the size of the previous version)' if previous >= written else ''}"
        f" beside the previous output, which is intact. Free space and run the stage again."
    )


def disk_full(path: str | Path, need: int | None = None, *, intact: str = "") -> DiskFull:
    """DiskFull for one file: its path, the free space now and (if known) the space it needs."""
    path = Path(path)
    needs = f"; it needs {_mib(need)}" if need else ""
    kept = f"; {intact}" if intact else ""
    return DiskFull(
        f"{path}: no space left on device ({_mib(_free(path.parent))} free on that filesystem)"
        f"{needs}{kept}. Free space and run again."
    )


_SQLITE_FULL = "database or disk is full"


def as_disk_full(exc: BaseException, fallback: str | Path | None = None) -> DiskFull | None:
    """The DiskFull that ``exc`` (or an exception in its chain) really is, else None.

    Recognises OSError ENOSPC (its filename, else ``fallback``) and SQLite's "database or disk
    is full" (MLflow's store: ``fallback`` names the database). The CLI and the flow call it at
    the stage boundary, so a full disk is one line, never a traceback from deep inside.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFull):
            return current
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return disk_full(current.filename or fallback or ".")
        if _SQLITE_FULL in str(current):
            return disk_full(fallback or ".", intact="the tracking store was not changed")
        current = current.__cause__ or current.__context__
    return None


@contextlib.contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a new empty staging directory; on success switch it in as ``out_dir`` atomically.

    On any error (or Ctrl-C) the staging directory is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging-{_owner_tag()}-{secrets.token_hex(4)}"
    os.mkdir(staging)  # mode 0o777 & ~umask, like every other output
    try:
        yield staging
        switch_in(staging, out_dir)
    except OSError as exc:
        full = exc.errno == errno.ENOSPC
        error = _disk_full(out_dir, staging) if full else None
        shutil.rmtree(staging, ignore_errors=True)
        if error is not None:
            raise error from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
