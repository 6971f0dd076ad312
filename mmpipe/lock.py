"""The project lock: one writer of a project's outputs at a time, with a message that says who.

    with project_lock(Path(".mmpipe"), what="mmpipe run"):
        ...run stages...

The lock is ``flock`` on ``<state_dir>/lock``; the file also holds its owner (pid, host, command,
start time, run id) as JSON, so a second run fails at once with
``project busy: mmpipe run (pid 123 on host-a) since 2026-11-26T02:00:00Z`` or, with ``wait``,
blocks until the first one ends. The kernel drops an ``flock`` when its process dies (kill -9
included), so a crashed run never leaves a stale lock; the owner record it leaves behind is only
reported ("previous holder … is gone"). On NFS, Linux maps ``flock`` to POSIX locks, which the
server arbitrates between hosts.

The lock is re-entrant within a process (a flow holds it while its tasks run stages in the same
process, in other threads) and is skipped by DDP ranks other than 0, which write nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmpipe.errors import MmpipeError
from mmpipe.io import try_flock

log = logging.getLogger(__name__)

LOCK_FILE = "lock"


class ProjectBusy(MmpipeError):
    """Another process holds the project lock (and we were not asked to wait, or waited too long)."""


_held: dict[str, tuple[int, int]] = {}  # lock path -> (fd, depth), this process
_guard = threading.Lock()


def _owner(what: str, run_id: str | None) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "what": what,
        "since": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "run_id": run_id,
        "argv": sys.argv[:6],
    }


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def describe(owner: dict[str, Any]) -> str:
    """One line naming a lock holder: what, pid, host, since, run id."""
    if not owner:
        return "another process (no owner record)"
    run = f", run {owner['run_id']}" if owner.get("run_id") else ""
    return (
        f"{owner.get('what', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}{run}) "
        f"since {owner.get('since', '?')}"
    )


def read_owner(state_dir: str | Path) -> dict[str, Any]:
    """The owner record of the project's lock file ({} when none)."""
    path = Path(state_dir) / LOCK_FILE
    if not path.is_file():
        return {}
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_owner(fd)
    finally:
        os.close(fd)


def _acquire(path: Path, what: str, run_id: str | None, wait: float) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    deadline = time.monotonic() + wait
    told = False
    while not try_flock(fd):
        owner = _holder(fd)
        if time.monotonic() >= deadline:
            os.close(fd)
            hint = "" if wait else "; pass --wait-lock SECONDS to wait for it"
            raise ProjectBusy(f"project busy: {describe(owner)} holds {path}{hint}")
        if not told:
            log.warning("project busy: %s; waiting up to %.0f s", describe(owner), wait)
            told = True
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
    previous = _read_owner(fd)
    if previous:  # a holder that released cleanly clears the record: this one died
        log.warning("previous holder of %s is gone: %s", path, describe(previous))
    _write_owner(fd, _owner(what, run_id))
    return fd


def _holder(fd: int, patience: float = 2.0) -> dict[str, Any]:
    """The holder's record, read while it is held. A holder writes its record just after it
    takes the lock, so a reader can land in between (on a loaded machine, for a while): an empty
    or half-written record is read again for up to ``patience`` seconds before the message says
    there is none."""
    deadline = time.monotonic() + patience
    owner = _read_owner(fd)
    while not owner and time.monotonic() < deadline:
        time.sleep(0.02)
        owner = _read_owner(fd)
    return owner


def _write_owner(fd: int, owner: dict[str, Any]) -> None:
    """Write the record, then cut what an older, longer one left after it: the file is never
    empty in between (a reader sees the old record, or the new one with a tail it rejects)."""
    raw = json.dumps(owner, sort_keys=True).encode()
    os.pwrite(fd, raw, 0)
    os.ftruncate(fd, len(raw))


def annotate(state_dir: str | Path, *, run_id: str) -> None:
    """Name the run (an MLflow run id) in the owner record of a lock this process holds.

    The first name sticks: a flow names its parent run, and the stages inside it keep it.
    """
    key = str(Path(state_dir).resolve() / LOCK_FILE)
    with _guard:
        held = _held.get(key)
    if held is None:
        return
    owner = _read_owner(held[0])
    if not owner.get("run_id"):
        _write_owner(held[0], {**owner, "run_id": run_id})


def _release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # a clean exit leaves no owner record
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def project_lock(
    state_dir: str | Path, *, what: str, run_id: str | None = None, wait: float = 0.0
) -> Iterator[None]:
    """Hold the project's lock for the block; ProjectBusy if another process holds it.

    ``wait`` seconds to wait for it (0 = fail at once). Re-entrant in one process.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # DDP ranks > 0 only read; rank 0 holds the lock
        yield
        return
    key = str(Path(state_dir).resolve() / LOCK_FILE)
    with _guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            nested = True
        else:
            nested = False
    if not nested:
        fd = _acquire(Path(key), what, run_id, wait)
        with _guard:
            _held[key] = (fd, 1)
    try:
        yield
    finally:
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
            else:
                del _held[key]
                _release(fd)
