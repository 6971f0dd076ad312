"""The MLflow UI's footprint: processes and resident memory of `mmpipe ui`'s server as started now
(no job runner, no telemetry) vs MLflow 3.17's defaults, side by side on the same store.

Each side: ``python -m mlflow server`` on a small store (an experiment, a few runs), started as
mmpipe.ui starts it, then the runs page's REST calls; then the process tree is counted and its
RSS summed (pages shared between forked processes count once per process: an upper bound). The
sides alternate (A B A B ...) and the smallest total of each side is kept.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "ui"


def make_store(root: Path, runs: int) -> Path:
    """A project dir whose .mmpipe/mlflow.db holds experiment "mmpipe" with ``runs`` runs."""
    from mlflow import MlflowClient

    state = root / ".mmpipe"
    state.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("mmpipe", artifact_location=(state / "mlartifacts").as_uri())
    for i in range(runs):
        run = client.create_run(exp, run_name="train")
        client.log_metric(run.info.run_id, "test.accuracy", 0.5 + i / 100)
        client.set_terminated(run.info.run_id)
    return root


def tree_footprint(pid: int) -> tuple[int, float]:
    """(processes, total RSS in MiB) of ``pid`` and all its descendants."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return len(procs), sum(p.memory_info().rss for p in procs) / 2**20


def measure(project: Path, port: int, job_runner: bool, settle: float) -> dict[str, Any]:
    """Start the UI server one way, browse the runs page's API, measure the process tree."""
    from mmpipe import services, ui
    from mmpipe.config import load_params

    target = ui.create_ui_target(load_params(None), project)
    env = ui.ui_env(target)
    if job_runner:  # MLflow 3.17's defaults
        env.pop("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
        env.pop("MLFLOW_DISABLE_TELEMETRY")
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = services.start_server(
        ui.ui_command(target, port=port), name="mlflow ui", health_url=f"{base}/health",
        log_file=target.state_dir / "ui-bench.log", env=env, cwd=target.state_dir,
    )  # fmt: skip
    start_s = time.perf_counter() - t0
    try:
        exp = ui.get_experiment(base, "mmpipe")
        assert exp is not None
        ui.recent_runs(base, str(exp["experiment_id"]))
        urllib.request.urlopen(f"{base}/", timeout=30).read()  # noqa: S310 - loopback
        time.sleep(settle)  # the job runner starts its huey consumers after /health
        n, rss = tree_footprint(proc.pid)
    finally:
        services.stop_group(proc)
    return {"processes": n, "rss_mib": rss, "start_seconds": start_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    repeats = c.pick(args, 1, 1, 2)
    settle = c.pick(args, 3.0, 8.0, 8.0)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with c.workdir(args, NAME) as work:
        project = make_store(work / "project", runs=c.pick(args, 3, 20, 50))
        sides: dict[str, list[dict[str, Any]]] = {"mlflow-default": [], "mmpipe": []}
        for _ in range(repeats):
            for side in sides:
                port = _free_port()
                sides[side].append(measure(project, port, side == "mlflow-default", settle))
    best = {k: min(v, key=lambda m: m["rss_mib"]) for k, v in sides.items()}
    base, ours = best["mlflow-default"], best["mmpipe"]
    # mmpipe ui's own process (the CLI waiting on the server) is not in either tree
    figures = [
        c.figure("UI processes, MLflow 3.17 defaults", base["processes"], "processes"),
        c.figure(
            "UI processes, mmpipe ui (no job runner)",
            ours["processes"],
            "processes",
            ratio=ours["processes"] / base["processes"],
        ),  # fmt: skip
        c.figure("UI RSS, MLflow 3.17 defaults", base["rss_mib"], "MiB"),
        c.figure(
            "UI RSS, mmpipe ui (no job runner)",
            ours["rss_mib"],
            "MiB",
            ratio=ours["rss_mib"] / base["rss_mib"],
            target="< 0.5 of the default",
            met=ours["rss_mib"] < 0.5 * base["rss_mib"],
        ),  # fmt: skip
        c.figure(
            "UI start to /health, mmpipe ui",
            ours["start_seconds"],
            "s",
            ratio=ours["start_seconds"] / base["start_seconds"],
            note=f"MLflow defaults: {base['start_seconds']:.1f} s",
        ),  # fmt: skip
    ]
    conditions = {
        "store": "sqlite, 1 experiment, few runs", "workers": 1, "settle_seconds": settle,
        "counted": "server process tree (mlflow server + its children), not the mmpipe CLI",
    }  # fmt: skip
    return c.finish(NAME, args, argv, figures, conditions, {"runs": sides}, started)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
