"""flows/schedule.py against a REAL local Prefect server: cron runs get scheduled, served runs run,
one run at a time, a restarted serve process picks the schedule up again.

The serve process runs `flows.schedule.main(..., flow=tiny_nightly)` in a subprocess (as
`mmpipe schedule` would, with a stand-in flow that only writes a file), so Prefect's runner, signal
handling and flow-run subprocesses are the real ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from prefect import flow

from flows import schedule
from mmpipe import services

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CRON = "30 2 * * *"
TIMEZONE = "Europe/Paris"  # not UTC: the schedule must carry the timezone (cron is UTC without)
OVERRIDES = ["train.epochs=1", "shard.copies=0"]
HOLD = "hold"  # while this file exists in the project, a tiny_nightly run keeps running


@flow(name="tiny-nightly")
def tiny_nightly(
    params_file: str = "params.yaml", overrides: list[str] | None = None, project_dir: str = "."
) -> str:
    """Stand-in for flows.nightly.nightly (same parameters): records what it was called with."""
    project = Path(project_dir)
    deadline = time.monotonic() + 90
    while (project / HOLD).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    out = project / "tiny-nightly-ran.json"
    out.write_text(json.dumps({"params_file": params_file, "overrides": overrides}))
    return str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` on a free loopback port, state in a temp PREFECT_HOME."""
    project = _project(tmp_path_factory.mktemp("sched-project"))
    port = _free_port()
    t0 = time.monotonic()
    proc = schedule.start_server(project, port)
    print(f"prefect server up in {time.monotonic() - t0:.1f} s")
    try:
        assert schedule.server_healthy(port)
        assert (schedule.prefect_home(project) / "prefect.db").is_file()  # not ~/.prefect
        yield project, port
    finally:
        services.stop_group(proc)
    assert proc.poll() is not None


def _project(path: Path) -> Path:
    """A project dir with the params file the serve process validates before serving."""
    (path / "my-params.yaml").write_text("train:\n  epochs: 3\n")
    return path


def _start_serving(project: Path, port: int) -> tuple[subprocess.Popen, Path]:
    """`python -m flows.schedule ...` serving tiny_nightly instead of the nightly flow."""
    code = (
        "import sys; from flows.schedule import main;"
        "from tests.integration.test_schedule import tiny_nightly;"
        "sys.exit(main(sys.argv[1:], flow=tiny_nightly))"
    )
    args = ["--cron", CRON, "--timezone", TIMEZONE, "--port", str(port), "--project-dir"]
    args += [str(project), "--params", str(project / "my-params.yaml")]
    for o in OVERRIDES:
        args += ["--set", o]
    env = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PYTHONUNBUFFERED": "1"}
    log = project / "serve.log"
    with log.open("ab") as out:
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
        services.stop_group(proc)


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
    expected_params = {  # a --params on the command line is the working directory's: absolute
        "params_file": str(project / "my-params.yaml"),
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
        assert sched.active and not dep.paused
        assert dep.global_concurrency_limit.limit == 1  # one nightly run at a time
        assert dep.concurrency_options.collision_strategy == "CANCEL_NEW"

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
    assert written == {"params_file": str(project / "my-params.yaml"), "overrides": OVERRIDES}
    print(f"served run completed after {time.monotonic() - t0:.1f} s")

    # SIGTERM (what a service manager sends) stops serving promptly; the reused server survives
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(20)
    assert schedule.server_healthy(port)


def test_serve_starts_its_own_server_and_stops_it_on_sigterm(tmp_path):
    """No server on the port: `flows.schedule` starts one (state under the project) and, when the
    serve process gets SIGTERM, stops it too: no orphaned server keeps the port."""
    port = _free_port()
    proc, log = _start_serving(_project(tmp_path), port)
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
        services.stop_group(proc)


@contextlib.contextmanager
def _client(port: int):
    """A sync client of the server on ``port``; run_deployment() inside talks to it too."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings(updates={PREFECT_API_URL: schedule.api_url(port)}),
        get_client(sync_client=True) as client,
    ):
        yield client


def _deployment(client, proc, log):
    """The served deployment, once the runner of the serve process ``proc`` has polled it: from
    then on its signal handling (pause the schedule on SIGTERM) is in place."""
    import psutil

    name = f"tiny-nightly/{schedule.DEPLOYMENT}"
    started = datetime.fromtimestamp(psutil.Process(proc.pid).create_time(), UTC)

    def read():
        try:
            dep = client.read_deployment_by_name(name)
        except Exception:  # ObjectNotFound until the serve process has registered it
            return None
        return dep if dep.last_polled is not None and dep.last_polled > started else None

    return _wait_for("the deployment", read, 60, proc, log)


def _states(client, run_ids, done, proc, log, timeout: float = 60) -> dict:
    """Wait until every run's state type is in ``done``; {run id: state}."""

    def read():
        states = {i: client.read_flow_run(i).state for i in run_ids}
        return states if all(st.type.value in done for st in states.values()) else None

    return _wait_for(f"runs to reach {done}", read, timeout, proc, log)


def test_one_nightly_run_at_a_time_a_colliding_run_is_cancelled(served):
    from prefect.deployments import run_deployment

    project, port, proc, log = served
    (project / HOLD).touch()  # the first run keeps its slot until released
    try:
        with _client(port) as client:
            dep = _deployment(client, proc, log)
            first = run_deployment(dep.id, timeout=0)
            _states(client, [first.id], {"RUNNING"}, proc, log)
            second = run_deployment(dep.id, timeout=0)  # e.g. 02:00 while last night overruns
            st = _states(client, [second.id], {"CANCELLED"}, proc, log)[second.id]
            assert "concurrency limit" in (st.message or "").lower(), st
            assert client.read_flow_run(first.id).state.is_running()
            (project / HOLD).unlink()
            assert _states(client, [first.id], {"COMPLETED"}, proc, log)[first.id].is_completed()
    finally:
        (project / HOLD).unlink(missing_ok=True)


def test_restarted_serve_resumes_the_schedule_and_runs_one_missed_night(server):
    """What a service manager's restart does. A clean stop (SIGTERM) pauses the schedule, serving
    again resumes it. A killed serve process leaves the runs that fell due meanwhile Late: the
    restarted one runs one of them and the concurrency limit cancels the others."""
    from prefect.states import Scheduled

    _, port = server
    project = server[0].parent / f"restart-{uuid.uuid4().hex[:6]}"
    project.mkdir()
    _project(project)
    with _client(port) as client:
        proc, log = _start_serving(project, port)
        dep = _deployment(client, proc, log)
        os.killpg(proc.pid, signal.SIGTERM)  # systemctl stop
        proc.wait(30)
        assert client.read_deployment(dep.id).paused  # no runs pile up while stopped

        proc, log = _start_serving(project, port)  # systemctl start
        _wait_for("resumed", lambda: (not client.read_deployment(dep.id).paused) or None, 60,
                  proc, log)  # fmt: skip
        os.killpg(proc.pid, signal.SIGKILL)  # a crash: nothing paused, nothing cleaned up
        proc.wait(10)
        assert not client.read_deployment(dep.id).paused
        (project / HOLD).touch()
        now = datetime.now(UTC)
        missed = [  # two nights that fell due while the serve process was dead
            client.create_flow_run_from_deployment(
                dep.id, state=Scheduled(scheduled_time=now - timedelta(hours=h))
            ).id
            for h in (49, 25)
        ]
        proc, log = _start_serving(project, port)  # Restart=always
        try:
            # 180 s, not 60: on a loaded machine the restarted runner has taken over a minute
            # to pick the late runs up (failed 2 of 7 runs on 2026-11-26, passed alone in 25 s)
            started = _states(client, missed, {"RUNNING", "CANCELLED"}, proc, log, timeout=180)
            assert sorted(st.type.value for st in started.values()) == ["CANCELLED", "RUNNING"]
            (project / HOLD).unlink()
            final = _states(client, missed, {"COMPLETED", "CANCELLED"}, proc, log)
            assert sorted(st.type.value for st in final.values()) == ["CANCELLED", "COMPLETED"]
            [sched] = client.read_deployment(dep.id).schedules
            assert sched.active
        finally:
            (project / HOLD).unlink(missing_ok=True)
            services.stop_group(proc)


def test_bad_set_exits_2_before_serving(tmp_path):
    """`mmpipe schedule --set train.epoch=2`: rejected now, not at 02:00; no server started."""
    port = _free_port()
    _project(tmp_path)
    cmd = [sys.executable, "-m", "mmpipe", "schedule", "--project-dir", str(tmp_path)]
    cmd += ["--params", str(tmp_path / "my-params.yaml"), "--set", "train.epoch=2"]
    cmd += ["--port", str(port)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "train.epoch: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    assert not services.port_in_use("127.0.0.1", port)
    assert not (tmp_path / ".mmpipe").exists()


def test_mmpipe_schedule_help_is_the_schedules_own():
    out = subprocess.run(
        [sys.executable, "-m", "mmpipe", "schedule", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for option in ("--cron", "--timezone", "--set", "--params", "--project-dir", "--port"):
        assert option in out.stdout


def test_bad_cron_or_timezone_fails_before_starting_anything(capsys):
    assert schedule.main(["--cron", "61 2 * * *", "--port", "1"]) == 2
    assert "Invalid cron string" in capsys.readouterr().err
    assert schedule.main(["--timezone", "Mars/Olympus", "--port", "1"]) == 2
    assert "Invalid timezone" in capsys.readouterr().err


def test_systemd_unit_runs_a_valid_schedule_command(tmp_path):
    unit = (REPO / "deploy" / "mmpipe-schedule.service").read_text()
    lines = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0].isalpha()
    )
    assert lines["Restart"] == "always" and lines["KillMode"] == "mixed"
    argv = shlex.split(lines["ExecStart"].replace("%h/mmpipe", str(REPO)))
    assert argv[:2] == [str(REPO / ".venv" / "bin" / "mmpipe"), "schedule"]
    args = schedule.parse_args(argv[2:])
    schedule.check_arguments(args)  # cron, timezone and the project's params all valid
    assert Path(args.project_dir) == REPO


def test_prefect_yaml_deploys_the_nightly_flow_to_a_work_pool(server, tmp_path):
    """deploy/prefect.yaml through Prefect's own `prefect deploy`, on the real server."""
    _, port = server
    env = {**os.environ, "PREFECT_API_URL": schedule.api_url(port), "MMPIPE_PROJECT_DIR": str(REPO)}
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    for cmd in (
        ["work-pool", "create", "mmpipe", "--type", "process", "--overwrite"],
        ["deploy", "--all", "--prefect-file", "deploy/prefect.yaml"],
    ):
        out = subprocess.run([*prefect, *cmd], cwd=REPO, env=env, capture_output=True, text=True)
        said = out.stdout + out.stderr
        # Prefect 3.8.8 (with fastapi 0.154) creates the deployment, then fails its closing
        # "any worker online?" query with a 422 (it sends limit=null): the one known failure
        if out.returncode != 0:
            assert "successfully created" in said and "/workers/filter" in said, said
    with _client(port) as client:
        dep = client.read_deployment_by_name("mmpipe-nightly/nightly")
        [sched] = dep.schedules
        assert (sched.schedule.cron, sched.schedule.timezone, sched.active) == (
            "0 2 * * *", "UTC", True
        )  # fmt: skip
        assert dep.work_pool_name == "mmpipe"
        assert dep.parameters["project_dir"] == str(REPO)
        assert dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy == "CANCEL_NEW"
        assert dep.pull_steps[0]["prefect.deployments.steps.set_working_directory"] == {
            "directory": str(REPO)
        }
