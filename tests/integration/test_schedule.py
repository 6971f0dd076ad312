"""flows/schedule.py against a REAL local Prefect server: cron runs get scheduled, served runs run.

The serve process runs `flows.schedule.main(..., flow=tiny_nightly)` in a subprocess (as
`mmpipe schedule` would, with a stand-in flow that only writes a file), so Prefect's runner, signal
handling and flow-run subprocesses are the real ones.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect import flow

from flows import schedule

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CRON = "30 2 * * *"
TIMEZONE = "Europe/Paris"  # not UTC: the schedule must carry the timezone (TRAPS.md)
OVERRIDES = ["train.epochs=1", "shard.copies=0"]


@flow(name="tiny-nightly")
def tiny_nightly(
    params_file: str = "params.yaml", overrides: list[str] | None = None, project_dir: str = "."
) -> str:
    """Stand-in for flows.nightly.nightly (same parameters): records what it was called with."""
    out = Path(project_dir) / "tiny-nightly-ran.json"
    out.write_text(json.dumps({"params_file": params_file, "overrides": overrides}))
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, state in a temp PREFECT_HOME."""
    project = tmp_path_factory.mktemp("sched-project")
    port = _free_port()
    t0 = time.monotonic()
    proc = schedule.start_server(project, port)
    print(f"prefect server up in {time.monotonic() - t0:.1f} s")
    try:
        assert schedule.server_healthy(port)
        assert (schedule.prefect_home(project) / "prefect.db").is_file()  # not ~/.prefect
        yield project, port
    finally:
        _stop_group(proc)
    assert proc.poll() is not None


def _start_serving(project: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """`python -m flows.schedule ...` serving tiny_nightly instead of the nightly flow."""
    code = (
        "import sys; from flows.schedule import main;"
        "from tests.integration.test_schedule import tiny_nightly;"
        "sys.exit(main(sys.argv[1:], flow=tiny_nightly))"
    )
    args = ["--cron", CRON, "--timezone", TIMEZONE, "--port", str(port), "--project-dir"]
    args += [str(project), "--params", "my-params.yaml"]
    for o in OVERRIDES:
        args += ["--set", o]
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONUNBUFFERED": "1"}
    log = project / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log


@pytest.fixture
def served(server):
    """The serve process, reusing the module's server."""
    project, port = server
    proc, log = _start_serving(project, port)
    try:
        yield project, port, proc, log
    finally:
        _stop_group(proc)


def _wait_for(what: str, fn, timeout: float, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve process died:\n{log.read_text()[-3000:]}"
        if (value := fn()) is not None:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; serve log:\n{log.read_text()[-3000:]}")


def _next_cron_times(n: int) -> list[datetime]:
    """The next n occurrences of CRON in TIMEZONE, as UTC instants (independent of Prefect)."""
    from cronsim import CronSim

    it = CronSim(CRON, datetime.now(ZoneInfo(TIMEZONE)))
    return [next(it).astimezone(UTC) for _ in range(n)]


def test_cron_runs_are_scheduled_and_a_served_run_completes(served):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    t0 = time.monotonic()
    project, port, proc, log = served
    expected_params = {
        "params_file": "my-params.yaml",
        "overrides": OVERRIDES,
        "project_dir": str(project.resolve()),
    }
    name = f"tiny-nightly/{schedule.DEPLOYMENT}"
    with (
        temporary_settings(updates={PREFECT_API_URL: schedule.api_url(port)}),
        get_client(sync_client=True) as client,
    ):

        def deployment():
            try:
                return client.read_deployment_by_name(name)
            except Exception:  # ObjectNotFound until the serve process has registered it
                return None

        dep = _wait_for("the deployment", deployment, 60, proc, log)
        assert dep.parameters == expected_params
        [sched] = dep.schedules
        assert (sched.schedule.cron, sched.schedule.timezone) == (CRON, TIMEZONE)
        assert sched.active

        scheduled = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        )
        by_dep = DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))

        def scheduled_runs():
            runs = client.read_flow_runs(  # the sync client sends limit/sort=None: a 422
                flow_run_filter=scheduled,
                deployment_filter=by_dep,
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
            return runs if len(runs) >= 3 else None

        runs = _wait_for("scheduled runs", scheduled_runs, 45, proc, log)
        starts = sorted(r.expected_start_time for r in runs)
        assert starts[:3] == _next_cron_times(3)
        assert all(r.parameters == expected_params for r in runs)
        print(f"deployment + {len(runs)} scheduled runs after {time.monotonic() - t0:.1f} s")

        # an ad-hoc run of the deployment, executed by the serving process
        run = run_deployment(name, timeout=60, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), run.state
        assert run.deployment_id == dep.id
    written = json.loads((project / "tiny-nightly-ran.json").read_text())
    assert written == {"params_file": "my-params.yaml", "overrides": OVERRIDES}
    print(f"served run completed after {time.monotonic() - t0:.1f} s")

    # SIGTERM (what a service manager sends) stops serving promptly; the reused server survives
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(20)
    assert schedule.server_healthy(port)


def test_serve_starts_its_own_server_and_stops_it_on_sigterm(tmp_path):
    """No server on the port: `flows.schedule` starts one (state under the project) and, when the
    serve process gets SIGTERM, stops it too: no orphaned server keeps the port."""
    port = _free_port()
    proc, log = _start_serving(tmp_path, port)
    try:
        _wait_for("serving", lambda: "Prefect UI" in log.read_text() or None, 90, proc, log)
        assert "started a Prefect server" in log.read_text()
        assert schedule.server_healthy(port)
        assert (schedule.prefect_home(tmp_path) / "prefect.db").is_file()
        proc.send_signal(signal.SIGTERM)  # the main process only, as a service manager would
        proc.wait(30)
        deadline = time.monotonic() + 15
        while schedule.server_healthy(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not schedule.server_healthy(port), "the server outlived the serve process"
    finally:
        _stop_group(proc)


def test_bad_cron_or_timezone_fails_before_starting_anything(capsys):
    assert schedule.main(["--cron", "61 2 * * *", "--port", "1"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err
    assert schedule.main(["--timezone", "Mars/Olympus", "--port", "1"]) == 2
    assert "Invalid timezone" in capsys.readouterr().err
