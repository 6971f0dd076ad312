"""mmpipe.services with a stand-in server (python -m http.server) that has a worker of its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mmpipe import services
from mmpipe.errors import MmpipeError

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_cmd(port: int) -> list[str]:
    """An HTTP server with a long-lived worker process in its group (like uvicorn's)."""
    http = f"{sys.executable} -m http.server --bind 127.0.0.1 {port}"
    return ["sh", "-c", f"sleep 300 & exec {http}"]


def _group_alive(pgid: int) -> bool:
    """Any process of the group still running (zombies waiting for a late-reaping init do not
    count: they hold no port and run nothing)."""
    return services._group_alive(pgid)


def test_a_group_of_zombies_is_not_alive():
    """A killed server's children linger as zombies where PID 1 reaps late; stop_group must
    not wait out both of its timeouts for them."""
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert services._group_alive(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while services._group_states(proc.pid) != ["Z"] and time.monotonic() < deadline:
            time.sleep(0.05)  # not reaped (no wait/poll): our child stays a zombie
        assert services._group_states(proc.pid) == ["Z"]
        os.killpg(proc.pid, 0)  # the kernel still lists the group ...
        assert not services._group_alive(proc.pid)  # ... but nothing in it runs
    finally:
        proc.kill()
        proc.wait()
    assert not services._group_alive(proc.pid)


def test_start_waits_until_healthy_and_stop_ends_the_whole_group(tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    proc = services.start_server(
        _server_cmd(port), name="test server", health_url=f"http://127.0.0.1:{port}/",
        log_file=log, timeout=30,
    )  # fmt: skip
    assert services.port_in_use("127.0.0.1", port)
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)  # its own group, not ours
    services.stop_group(proc)
    assert proc.poll() is not None
    assert not _group_alive(proc.pid)  # the `sleep` worker too
    assert not services.port_in_use("127.0.0.1", port)
    assert "starting test server" in log.read_text()


def test_a_server_that_dies_fails_with_its_log_tail(tmp_path):
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-c", "import sys; print('bad config: no such store'); sys.exit(3)"]
    with pytest.raises(MmpipeError, match=r"exited with code 3[\s\S]*bad config: no such store"):
        services.start_server(
            cmd, name="test server", health_url="http://127.0.0.1:1/", log_file=log, timeout=30
        )


def test_a_server_that_never_answers_is_stopped(tmp_path, monkeypatch):
    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(
        services.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1]
    )
    with pytest.raises(MmpipeError, match="did not answer"):
        services.start_server(
            ["sleep", "60"], name="mute", health_url="http://127.0.0.1:1/",
            log_file=tmp_path / "log", timeout=1,
        )  # fmt: skip
    assert started[0].poll() is not None


PARENT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from mmpipe import services
    # a terminal's process: Ctrl-C raises KeyboardInterrupt even when the test runner was
    # started as a background job (which inherits SIGINT ignored, and passes that on)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    port, log = int(sys.argv[1]), Path(sys.argv[2])
    cmd = ["sh", "-c", f"sleep 300 & exec {sys.executable} -m http.server --bind 127.0.0.1 {port}"]
    with services.stop_on_signals():
        proc = services.start_server(
            cmd, name="s", health_url=f"http://127.0.0.1:{port}/", log_file=log, timeout=30
        )
        try:
            print(proc.pid, flush=True)
            time.sleep(300)
        finally:
            services.stop_group(proc)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_parent_ended_by_term_hup_or_int_stops_its_server(sig, tmp_path):
    """kill, closing the terminal and Ctrl-C all run the parent's cleanup: no orphaned server."""
    port = _free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(port), str(tmp_path / "log")],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        server_pid = int(parent.stdout.readline())
        assert _group_alive(server_pid)
        parent.send_signal(sig)
        code = parent.wait(30)
        # SystemExit(128 + signal); an uncaught KeyboardInterrupt ends Python by SIGINT itself
        assert code == (-sig if sig == signal.SIGINT else 128 + sig)
        assert not _group_alive(server_pid)
        assert not services.port_in_use("127.0.0.1", port)
    finally:
        parent.kill()


def test_make_ui_and_schedule_take_a_port_and_arguments():
    def recipe(*args: str) -> str:
        out = subprocess.run(
            ["make", "-n", "-s", *args], cwd=REPO, capture_output=True, text=True, check=True
        )
        return out.stdout.strip().splitlines()[-1]

    assert recipe("ui").endswith("-m mmpipe ui --port 5000")
    assert recipe("ui", "PORT=5123", "ARGS=--set tracking.experiment=x").endswith(
        "-m mmpipe ui --port 5123 --set tracking.experiment=x"
    )
    assert recipe("schedule", "PORT=4300").endswith("-m mmpipe schedule --port 4300")


def test_port_in_use_sees_a_listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert services.port_in_use("127.0.0.1", s.getsockname()[1])
    time.sleep(0.05)
