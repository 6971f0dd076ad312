"""Local servers that mmpipe starts (the MLflow UI, a Prefect server): start, wait, stop.

A server runs as a subprocess in its own session, so it is one process group with its workers:
stopping the group ends them all, and a Ctrl-C in the terminal reaches only the parent, which
then stops the group. A parent killed by SIGTERM or SIGHUP (``kill``, a service manager, closing
the terminal) would die without running its ``finally`` blocks and leave the server reparented to
init, holding its port: ``stop_on_signals`` turns those signals into ``SystemExit`` so it does
not. (Nothing helps against SIGKILL; under systemd the unit's cgroup ends the rest.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from mmpipe.errors import MmpipeError

LOOPBACK = "127.0.0.1"


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True if a GET of ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - our own URLs
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def log_tail(path: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def start_server(
    cmd: Sequence[str],
    *,
    name: str,
    health_url: str,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 90.0,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (output appended to ``log_file``); return when healthy.

    If it exits, does not answer ``health_url`` within ``timeout`` s, or this process is
    interrupted meanwhile, the whole group is stopped and nothing is left running.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: stop_group() ends its workers too
        )
    try:
        wait_healthy(proc, health_url, log_file, timeout, name)
    except BaseException:  # timeout, crash, Ctrl-C or SIGTERM while waiting: leave no server
        stop_group(proc)
        raise
    return proc


def wait_healthy(
    proc: subprocess.Popen[bytes], health_url: str, log_file: Path, timeout: float, name: str
) -> None:
    """Poll ``health_url`` until it answers 200; MmpipeError (with the log tail) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MmpipeError(
                f"{name} exited with code {proc.returncode} before answering; "
                f"last lines of {log_file}:\n{log_tail(log_file)}"
            )
        if http_ok(health_url):
            return
        time.sleep(0.3)
    raise MmpipeError(
        f"{name} did not answer {health_url} within {timeout:.0f} s; "
        f"last lines of {log_file}:\n{log_tail(log_file)}"
    )


def stop_group(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """End the process group of a server started here: SIGTERM, then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # the leader may be gone while its workers live on: signal the group regardless
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs. Zombies do not count: where PID 1 reaps
    orphans late (some containers), a killed server's exited children linger as zombies in its
    group, and waiting for them would hold every stop for both timeouts."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group we may not signal is still there
        return True
    states = _group_states(pgid)
    return states is None or not states or any(state != "Z" for state in states)


def _group_states(pgid: int) -> list[str] | None:
    """The state letters (R, S, Z, ...) of the group's processes from /proc; None without it."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():  # pragma: no cover - not Linux
        return None
    states = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            states.append(fields[0])
    return states


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def stop_on_signals(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGHUP),
) -> Iterator[None]:
    """Inside: SIGTERM and SIGHUP raise SystemExit (exit code 128 + signal) so cleanup runs.

    SIGINT already raises KeyboardInterrupt. Only the main thread can set handlers; elsewhere
    this does nothing. The previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _exit_on_signal) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
