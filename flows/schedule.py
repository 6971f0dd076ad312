"""Serve the nightly flow on a cron schedule from a local Prefect server.

    python -m flows.schedule [--cron "0 2 * * *"] [--timezone UTC] [--port 4200]
                             [--params params.yaml] [--set section.key=value ...] [--project-dir .]
    mmpipe schedule [same arguments]

What it does:
1. Checks the arguments and the params (file + ``--set``) first, and exits 2 on an error: a bad
   override fails now, not at 02:00.
2. Starts ``prefect server start --host 127.0.0.1 --port PORT`` in a subprocess, with its state
   (SQLite DB, logs) under ``<project>/.mmpipe/prefect`` (``PREFECT_HOME``) and analytics off, or
   reuses a Prefect server that already answers ``/api/health`` on that port. A server this
   command started is stopped when it exits (Ctrl-C, SIGTERM, SIGHUP); its log is
   ``<project>/.mmpipe/prefect/server.log``.
3. Serves the nightly flow as deployment ``mmpipe-nightly/nightly`` with a cron schedule in the
   given timezone (Prefect's cron is UTC unless the schedule carries one) and the given
   parameters. The server's scheduler creates the flow runs; this process executes them when they
   are due (each in a subprocess) and only while it is alive.

One nightly run at a time: the deployment has a concurrency limit of 1 with the CANCEL_NEW
collision strategy. A run that becomes due while another one runs (a night that overran, an
ad-hoc run during the nightly one) is Cancelled ("Deployment concurrency limit reached") rather
than queued behind it. Missed nights: if this process was *killed* (crash, OOM, SIGKILL), the
runs that fell due meanwhile are Late; the restarted process picks them up at once, one of them
runs and the others are cancelled by the limit: one catch-up run. A clean stop (Ctrl-C, SIGTERM,
``systemctl stop``) pauses the schedule (Prefect's default for served deployments), so no runs
pile up while it is stopped; serving again resumes it (``paused=False``) with no catch-up.

Unattended: run it under a service manager that restarts it (``deploy/mmpipe-schedule.service``,
a systemd user unit), or deploy to a work pool served by a worker (``deploy/prefect.yaml``).
docs/scheduling.md has the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpipe import services
from mmpipe.config import ParamsError, add_params_arguments, params_from_args
from mmpipe.errors import MmpipeError
from mmpipe.layout import Layout

if TYPE_CHECKING:  # prefect is imported lazily: `--help` and argument errors stay fast
    from prefect import Flow
    from prefect.deployments.runner import RunnerDeployment

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_PORT = 4200
DEPLOYMENT = "nightly"
HOST = services.LOOPBACK
# At most one nightly run at a time; one that collides with a running one is cancelled.
CONCURRENCY_LIMIT = 1
COLLISION_STRATEGY = "CANCEL_NEW"


def prefect_home(project_dir: str | Path) -> Path:
    """Where this project's Prefect server keeps its database and logs."""
    return Layout(Path(project_dir).resolve()).prefect_home


def api_url(port: int) -> str:
    """The Prefect API on the loopback interface."""
    return f"http://{HOST}:{port}/api"


def server_env(project_dir: str | Path, port: int) -> dict[str, str]:
    """Environment of the Prefect server subprocess."""
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
    return services.http_ok(f"{api_url(port)}/health", timeout)


def start_server(
    project_dir: str | Path, port: int, timeout: float = 90.0
) -> subprocess.Popen[bytes]:
    """Start `prefect server start` on 127.0.0.1:port, wait for /api/health; the Popen."""
    home = prefect_home(project_dir)
    cmd = [sys.executable, "-m", "prefect", "server", "start"]
    cmd += ["--host", HOST, "--port", str(port), "--analytics-off"]
    return services.start_server(
        cmd,
        name="the Prefect server",
        health_url=f"{api_url(port)}/health",
        log_file=home / "server.log",
        env=server_env(project_dir, port),
        cwd=home,
        timeout=timeout,
    )


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
        services.stop_group(proc)


def nightly_parameters(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str | Path = ".",
    wait_lock: float = 0.0,
) -> dict[str, Any]:
    """Parameters of every scheduled run; the project dir is made absolute (runs have no cwd).

    ``wait_lock``: how long a run waits for a busy project (an ad-hoc run) before failing.
    """
    params = {
        "params_file": params_file,  # nightly() resolves a relative path against project_dir
        "overrides": list(overrides or []),
        "project_dir": str(Path(project_dir).resolve()),
    }
    return {**params, "wait_lock": wait_lock} if wait_lock else params


def build_deployment(
    flow: Flow[..., Any],
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    parameters: dict[str, Any] | None = None,
    name: str = DEPLOYMENT,
) -> RunnerDeployment:
    """The served deployment: the flow on a cron schedule in `timezone`, one run at a time."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    return flow.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=parameters or {},
        description=f"{flow.name} at cron {cron!r} ({timezone})",
        tags=["mmpipe"],
        concurrency_limit=ConcurrencyLimitConfig(
            limit=CONCURRENCY_LIMIT,
            collision_strategy=ConcurrencyLimitStrategy(COLLISION_STRATEGY),
        ),
        # a clean stop paused the schedule (Prefect's default): serving again resumes it
        paused=False,
        # import the flow by module path (flows.nightly.nightly): no cwd-relative file path
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def create_runner() -> Any:
    """``prefect.serve``'s Runner (the schedule paused on a clean stop), stopped by SIGTERM
    without a warning: Prefect's own handler calls the async ``stop`` from inside the event loop
    and never awaits it (``RuntimeWarning: coroutine 'Runner.astop' was never awaited``).
    Exiting unwinds ``Runner.start`` instead, which stops the runner and pauses the schedule,
    exactly what the handler's exit did after the lost call."""
    from prefect.runner import Runner

    class QuietRunner(Runner):
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            self._logger.info("SIGTERM received, shutting down...")
            sys.exit(0)

    return QuietRunner(pause_on_shutdown=True)


def serve_schedule(
    project_dir: str | Path = ".",
    cron: str = DEFAULT_CRON,
    timezone: str = DEFAULT_TIMEZONE,
    port: int = DEFAULT_PORT,
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    flow: Flow[..., Any] | None = None,
    wait_lock: float = 0.0,
) -> None:
    """Start/reuse the server and serve the nightly deployment until stopped (blocks)."""
    if flow is None:
        from flows.nightly import nightly as flow
    from prefect.exceptions import TerminationSignal
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        temporary_settings,
    )

    params = nightly_parameters(params_file, overrides, project_dir, wait_lock)
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
            runner = create_runner()
            runner.add_deployment(deployment)
            with contextlib.suppress(TerminationSignal):  # as prefect.serve, quiet on SIGTERM
                asyncio.run(runner.start())


def check_arguments(args: argparse.Namespace) -> None:
    """Fail before starting anything: bad cron, unknown timezone, params that do not validate."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=args.cron, timezone=args.timezone)
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ValueError(f"{reasons} (cron e.g. '0 2 * * *', timezone e.g. Europe/Paris)") from exc
    # what each scheduled run will load: nightly() reads the same file with the same overrides
    params_from_args(args)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Arguments of `python -m flows.schedule` / `mmpipe schedule`."""
    ap = argparse.ArgumentParser(
        prog="mmpipe schedule",
        description=__doc__.split("\n")[0],
        epilog="Unattended use, missed and overlapping nights: docs/scheduling.md.",
    )
    ap.add_argument(
        "--cron", default=DEFAULT_CRON, help=f"cron schedule (default {DEFAULT_CRON!r})"
    )
    ap.add_argument(
        "--timezone", default=DEFAULT_TIMEZONE, help="IANA timezone of the cron (default UTC)"
    )
    ap.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"Prefect server port (default {DEFAULT_PORT})",
    )
    add_params_arguments(ap, writes=True)  # applied to every scheduled run; checked now
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, flow: Flow[..., Any] | None = None) -> int:
    """CLI entry point; `flow` replaces the nightly flow (tests)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        check_arguments(args)
    except (ValueError, ParamsError) as exc:
        print(f"mmpipe schedule: error: {exc}", file=sys.stderr)
        return 2
    try:
        # SIGTERM/SIGHUP -> SystemExit, so the Prefect server started here is stopped too
        with services.stop_on_signals(), contextlib.suppress(KeyboardInterrupt):
            serve_schedule(
                args.project_dir,
                args.cron,
                args.timezone,
                args.port,
                args.params,
                args.overrides,
                flow,
                args.wait_lock,
            )
    except MmpipeError as exc:  # the server did not start: its log tail is in the message
        print(f"mmpipe schedule: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
