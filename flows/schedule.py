"""Serve the nightly flow on a cron schedule from a local Prefect server.

    python -m flows.schedule [--cron "0 2 * * *"] [--timezone UTC] [--port 4200]
                             [--params params.yaml] [--set section.key=value ...] [--project-dir .]
    mmpipe schedule [same arguments]

What it does:
1. Starts ``prefect server start --host 127.0.0.1 --port PORT`` in a subprocess, with its state
   (SQLite DB, logs) under ``<project>/.mmpipe/prefect`` (``PREFECT_HOME``) and analytics off, or
   reuses a Prefect server that already answers ``/api/health`` on that port. A server this
   command started is stopped when it exits; its log is ``<project>/.mmpipe/prefect/server.log``.
2. Serves the nightly flow as deployment ``mmpipe-nightly/nightly`` with a cron schedule in the
   given timezone (Prefect's cron is UTC unless the schedule carries one) and the given
   parameters. The server's scheduler creates the flow runs; this process executes them when they
   are due (each in a subprocess) and only while it is alive: stop it and the runs go Late.
   Ctrl-C stops serving (and pauses the schedule, Prefect's default for served deployments).

The Prefect UI (runs, schedule, logs) is at ``http://127.0.0.1:PORT``.

A shared Prefect server and a work pool, instead of this one-process set-up:

    export PREFECT_API_URL=http://prefect.internal:4200/api   # the shared server
    prefect work-pool create mmpipe --type process            # once
    prefect deploy flows/nightly.py:nightly -n nightly -p mmpipe \\
        --cron "0 2 * * *" --timezone Europe/Paris \\
        --param project_dir=/srv/mmpipe --param params_file=params.yaml
    prefect worker start -p mmpipe                            # on the training machine(s)

(or in Python: ``nightly.deploy(name="nightly", work_pool_name="mmpipe",
schedules=[Cron("0 2 * * *", timezone="Europe/Paris")], parameters={...})`` with the code reachable
by the worker, e.g. ``nightly.from_source(<git url>, "flows/nightly.py:nightly")``). The worker,
not a ``serve`` process, then has to be alive at 02:00; the server keeps the schedule. To reuse a
running server with this module instead, pass its ``--port`` (it must listen on 127.0.0.1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # prefect is imported lazily: `--help` and the CLI stay fast
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_PORT = 4200
DEPLOYMENT = "nightly"
HOST = "127.0.0.1"
SERVER_ENTRY = "_server"  # argv[0] of the internal server entry point (see main)


def prefect_home(project_dir: str | Path) -> Path:
    """Where this project's Prefect server keeps its database and logs."""
    return Path(project_dir).resolve() / ".mmpipe" / "prefect"


def api_url(port: int) -> str:
    """The Prefect API on the loopback interface."""
    return f"http://{HOST}:{port}/api"


def server_env(project_dir: str | Path, port: int) -> dict[str, str]:
    """Environment of the Prefect server subprocess (and of this process's Prefect client)."""
    home = prefect_home(project_dir)
    return {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": api_url(port),
    }


def server_healthy(port: int, timeout: float = 2.0) -> bool:
    """True if a Prefect API answers /api/health on 127.0.0.1:port."""
    try:
        with urllib.request.urlopen(f"{api_url(port)}/health", timeout=timeout) as resp:  # noqa: S310
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """End a process group we started (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def patch_prefect_for_sqlalchemy_2_1() -> bool:
    """Let Prefect 3.8.8's scheduler insert runs under SQLAlchemy 2.1; True if it patched.

    The scheduler bulk-inserts flow-run dicts that carry a ``state`` key, which is a hybrid
    property of the FlowRun/TaskRun ORM models. SQLAlchemy 2.0 ignored such non-column keys;
    2.1 calls the hybrid's ``bulk_dml`` hook and raises "Can't evaluate bulk DML statement; please
    supply a bulk_dml decorated function" when there is none, so no cron run is ever created.
    Prefect inserts the states itself right after, so a no-op hook restores 2.0's behaviour.
    Remove once SQLAlchemy is pinned <2.1 or Prefect defines the hook.
    """
    import sqlalchemy

    if tuple(int(x) for x in sqlalchemy.__version__.split(".")[:2]) < (2, 1):
        return False
    from prefect.server.database import orm_models

    patched = False
    for model in (orm_models.FlowRun, orm_models.TaskRun):
        hybrid = model.__dict__.get("state")
        if hybrid is not None and getattr(hybrid, "bulk_dml_setter", "n/a") is None:
            hybrid.inplace.bulk_dml(_ignore_state_in_bulk_insert)
            patched = True
    return patched


def _ignore_state_in_bulk_insert(cls: type, mapping: dict[str, Any], value: Any) -> None:
    """SQLAlchemy 2.0 behaviour: the ``state`` key of a bulk-inserted row sets no column."""


def _run_prefect_server(argv: list[str]) -> int:
    """`prefect server start ARGS` in this process, after the SQLAlchemy 2.1 patch."""
    patch_prefect_for_sqlalchemy_2_1()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *argv]
    app()
    return 0


def start_server(
    project_dir: str | Path, port: int, timeout: float = 90.0
) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on 127.0.0.1:port and wait for /api/health."""
    home = prefect_home(project_dir)
    home.mkdir(parents=True, exist_ok=True)
    log_file = home / "server.log"
    # `python -m flows.schedule _server ...` == `prefect server start ...` plus the compat patch
    cmd = [sys.executable, "-m", "flows.schedule", SERVER_ENTRY]
    cmd += ["--host", HOST, "--port", str(port), "--analytics-off"]
    with log_file.open("ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=server_env(project_dir, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parents[1],  # so `-m flows.schedule` imports this repo
            start_new_session=True,  # own process group: _stop() ends uvicorn and services too
        )
    try:
        _wait_healthy(proc, port, log_file, timeout)
    except BaseException:  # timeout, crash, Ctrl-C or SIGTERM while waiting: leave no server
        _stop(proc)
        raise
    return proc


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"prefect server exited with {proc.returncode}; {log_file}:\n{tail}")
        if server_healthy(port):
            return
        time.sleep(0.5)
    raise TimeoutError(f"prefect server did not answer on {api_url(port)} within {timeout:.0f} s")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM -> SystemExit, so `finally` blocks stop the server we started."""
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def prefect_server(project_dir: str | Path, port: int = DEFAULT_PORT) -> Iterator[str]:
    """Reuse the Prefect server answering on the port, else start one (stopped on exit); API URL."""
    if server_healthy(port):
        print(f"reusing the Prefect server on {api_url(port)}", flush=True)
        yield api_url(port)
        return
    proc = start_server(project_dir, port)
    print(f"started a Prefect server on {api_url(port)} (state in {prefect_home(project_dir)})")
    try:
        yield api_url(port)
    finally:
        _stop(proc)


def nightly_parameters(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str | Path = ".",
) -> dict[str, Any]:
    """Parameters of every scheduled run; the project dir is made absolute (runs have no cwd)."""
    return {
        "params_file": params_file,  # nightly() resolves a relative path against project_dir
        "overrides": list(overrides or []),
        "project_dir": str(Path(project_dir).resolve()),
    }


def build_deployment(
    flow: Flow[..., Any],
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    parameters: dict[str, Any] | None = None,
    name: str = DEPLOYMENT,
) -> RunnerDeployment:
    """The served deployment: the flow on a cron schedule in `timezone`, with fixed parameters."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters or {},
        description=f"{flow.name} at cron {cron!r} ({timezone})",
        tags=["mmpipe"],
        # import the flow by module path (flows.nightly.nightly): no cwd-relative file path
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def serve_schedule(
    project_dir: str | Path = ".",
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    port: int = DEFAULT_PORT,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    flow: Flow[..., Any] | None = None,
) -> None:
    """Start/reuse the server and serve the nightly deployment until interrupted (blocks)."""
    _validate(cron, timezone)
    if flow is None:
        from flows.nightly import nightly as flow
    from prefect import serve
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    params = nightly_parameters(params_file, overrides, project_dir)
    if threading.current_thread() is threading.main_thread():
        # until Prefect's runner installs its own SIGTERM handler (which also exits cleanly),
        # the default action would kill this process and orphan the server it started
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with prefect_server(project_dir, port) as url:
        # settings (not only os.environ) reach the client here and the flow-run subprocesses
        updates = {
            PREFECT_API_URL: url,
            PREFECT_HOME: str(prefect_home(project_dir)),
            PREFECT_SERVER_ANALYTICS_ENABLED: False,
        }
        with temporary_settings(updates=updates):
            deployment = build_deployment(flow, cron, timezone, params)
            print(f"serving {flow.name}/{DEPLOYMENT} at cron {cron!r} ({timezone}); Ctrl-C stops")
            print(f"Prefect UI: {url.removesuffix('/api')}/deployments", flush=True)
            serve(deployment, print_starting_message=False)


def _validate(cron: str, timezone: str) -> None:
    """Fail before starting anything on a bad cron string or an unknown timezone."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"{reasons} (cron e.g. '0 2 * * *', timezone e.g. Europe/Paris)") from exc


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m flows.schedule` / `mmpipe schedule`."""
    ap = argparse.ArgumentParser(
        prog="python -m flows.schedule", description=__doc__.split("\n")[0]
    )
    ap.add_argument(
        "--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r})"
    )
    ap.add_argument("--timezone", default=DEFAULT_TIMEZONE, help="IANA timezone of the cron")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help="Prefect server port")
    ap.add_argument("--params", default="params.yaml", help="params file (relative: to project)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--project-dir", default=".")
    return ap


def main(argv: list[str] | None = None, flow: Flow[..., Any] | None = None) -> int:
    """CLI entry point; `flow` replaces the nightly flow (tests)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SERVER_ENTRY]:  # internal: the server subprocess started by start_server
        return _run_prefect_server(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _validate(args.cron, args.timezone)
    except ValueError as exc:
        print(f"mmpipe schedule: error: {exc}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        serve_schedule(
            args.project_dir, args.cron, args.timezone, args.port, args.params, args.overrides, flow
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
