"""The project lock: a second writer is refused (or waits), a killed holder leaves no stale lock."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmpipe.lock import ProjectBusy, project_lock, read_owner

REPO = Path(__file__).resolve().parents[2]

_HOLDER = """
import sys, time
from mmpipe.lock import project_lock
with project_lock(sys.argv[1], what="mmpipe run", run_id="night-1"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _start_holder(state: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLDER), str(state), str(seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_told_who_holds_the_project(tmp_path):
    holder = _start_holder(tmp_path, 30)
    try:
        with pytest.raises(ProjectBusy) as info, project_lock(tmp_path, what="mmpipe shard"):
            pass
        msg = str(info.value)
        assert msg.startswith("project busy: mmpipe run")
        assert f"pid {holder.pid}" in msg and "run night-1" in msg and "--wait-lock" in msg
    finally:
        holder.kill()
        holder.wait()


def test_kill9_of_the_holder_leaves_no_stale_lock(tmp_path, caplog):
    holder = _start_holder(tmp_path, 30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert read_owner(tmp_path)["pid"] == holder.pid  # the record survives the kill...
    with caplog.at_level(logging.WARNING, logger="mmpipe.lock"), project_lock(tmp_path, what="t"):
        assert read_owner(tmp_path)["pid"] == os.getpid()  # ...but the lock does not
    assert "is gone" in caplog.text
    assert read_owner(tmp_path) == {}  # a clean release clears the record


def test_wait_blocks_until_the_holder_ends(tmp_path):
    holder = _start_holder(tmp_path, 1.5)
    start = time.monotonic()
    with project_lock(tmp_path, what="second", wait=30):
        waited = time.monotonic() - start
    holder.wait()
    assert 0.5 < waited < 30


def test_reentrant_in_one_process_and_skipped_by_other_ranks(tmp_path, monkeypatch):
    with project_lock(tmp_path, what="flow"), project_lock(tmp_path, what="stage"):
        assert read_owner(tmp_path)["what"] == "flow"
    assert read_owner(tmp_path) == {}
    holder = _start_holder(tmp_path, 30)
    try:
        monkeypatch.setenv("RANK", "1")
        with project_lock(tmp_path, what="rank 1"):  # a DDP worker rank writes nothing
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_that_has_not_written_its_record_yet_is_still_named(tmp_path):
    """Between taking the flock and writing its record a holder's file is empty (for a while on
    a loaded machine): the refused writer waits for the record instead of saying 'no owner'."""
    import fcntl
    import json
    import threading

    from mmpipe.lock import LOCK_FILE

    path = tmp_path / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, no record yet
    record = {"pid": 4242, "host": "h", "what": "mmpipe run", "since": "now", "run_id": None}
    late = threading.Timer(0.3, lambda: os.pwrite(fd, json.dumps(record).encode(), 0))
    late.start()
    try:
        busy = pytest.raises(ProjectBusy, match=r"project busy: mmpipe run \(pid 4242 on h\)")
        with busy, project_lock(tmp_path, what="mmpipe run"):
            pass
    finally:
        late.join()
        os.close(fd)
