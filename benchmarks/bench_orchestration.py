"""Orchestration costs: the Prefect nightly flow vs the same stage functions called directly, a
no-op ``dvc repro``, and MLflow's logging cost per epoch.

* flow vs direct: two fresh projects (tests/conftest.make_project) with the same params. Direct =
  mmpipe.pipeline's stage functions in order with the same MLflow parent/nested runs the flow
  opens (so the difference is Prefect alone). Both run in this process after a warm-up (imports,
  a trivial flow that starts Prefect's ephemeral server); the server start is reported apart.
* dvc: a tiny project, ``dvc repro`` once, then ``dvc repro`` again (nothing changed), timed.
* MLflow: ``tracking.epoch_logger(run_id)`` called with 20 metrics, median of repeated calls,
  vs the epoch duration of the flow's own training run.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "orchestration"

# ~30 s of stages per run on this machine (full mode); every stage does real work.
MEDIUM = [
    "ingest.synthetic.n_images=800",
    "ingest.synthetic.captions_per_image=2",
    "ingest.synthetic.image_size=64",
    "shard.image_size=48",
    "shard.copies=0",
    "train.epochs=2",
    "train.batch_size=64",
    "train.width=64",
    "train.embed_dim=64",
    "train.head_hidden=64",
    "train.warmup_steps=5",
    "train.num_workers=0",
    "evaluate.ablation_epochs=5",
]


def _conftest() -> Any:
    sys.path.insert(0, str(c.REPO))
    from tests import conftest

    return conftest


def run_direct(project: Path) -> dict[str, Any]:
    """What the flow does, minus Prefect: parent MLflow run, each stage nested, close."""
    from mmpipe import pipeline
    from mmpipe.config import load_params
    from mmpipe.layout import Layout

    fresh_tracking_env()
    params = load_params(project / "params.yaml", [])
    layout = Layout(project)
    parent = pipeline.open_flow_run(params, layout)
    out = {}
    for name in pipeline.ORDER:  # every stage, in the DAG's order (layout.STAGES)
        t0 = time.perf_counter()
        out[name] = pipeline.run_stage(name, params, layout, parent_run_id=parent)
        out[f"{name}_seconds"] = time.perf_counter() - t0
    pipeline.close_flow_run(params, layout, parent, "FINISHED", "direct")
    return out


def fresh_tracking_env() -> None:
    """Forget a MLFLOW_TRACKING_URI left in the environment, so each project uses its own store."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def run_flow(project: Path) -> dict[str, Any]:
    from flows.nightly import nightly

    fresh_tracking_env()
    return nightly(params_file="params.yaml", overrides=None, project_dir=str(project))


def epoch_seconds(project: Path, parent_run_id: str) -> list[float]:
    """The flow's train epochs' wall times, from its MLflow train run (versioned outputs hold no
    timings)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    train = client.search_runs(
        [parent.info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.run_name = 'train'",
    )[0]
    return [m.value for m in client.get_metric_history(train.info.run_id, "epoch_seconds")]


def warm_prefect() -> float:
    """A trivial flow: starts the ephemeral Prefect server (paid once per process)."""
    from prefect import flow

    @flow(name="bench-warmup")
    def noop() -> int:
        return 1

    t0 = time.perf_counter()
    noop()
    return time.perf_counter() - t0


def dvc_noop(project: Path, env: dict[str, str]) -> dict[str, float]:
    dvc = str(Path(sys.executable).parent / "dvc")
    t0 = time.perf_counter()
    subprocess.run([dvc, "repro", "-q"], cwd=project, env=env, check=True, capture_output=True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        out = subprocess.run(
            [dvc, "repro"], cwd=project, env=env, check=True, capture_output=True, text=True
        )
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    subprocess.run([dvc, "version"], cwd=project, env=env, check=True, capture_output=True)
    startup = time.perf_counter() - t0
    skipped = "didn't change" in out.stdout or "Data and pipelines are up to date" in out.stdout
    return {
        "first_repro": first,
        "noop_repro": min(times),
        "noop_all": times,
        "dvc_version_cmd": startup,
        "noop_said_up_to_date": skipped,
    }


def mlflow_epoch_cost(root: Path, calls: int) -> dict[str, float]:
    from mmpipe import tracking
    from mmpipe.config import TrackingParams

    fresh_tracking_env()
    tp = TrackingParams(experiment="bench")
    with tracking.start_run(tp, root, run_name="bench-logging") as run_id:
        log = tracking.epoch_logger(run_id)
        times = []
        for epoch in range(calls):
            metrics = {f"metric_{i:02d}": 0.5 + epoch * 0.01 + i for i in range(20)}
            t0 = time.perf_counter()
            log(epoch + 1, metrics)
            times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "max": max(times), "calls": calls}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    conftest = _conftest()
    overrides = c.pick(
        args,
        conftest.TINY_OVERRIDES,
        MEDIUM[:1] + ["ingest.synthetic.n_images=300"] + MEDIUM[2:],
        MEDIUM,
    )
    env = conftest.git_env()
    os.environ["PATH"] = env["PATH"]  # dvc / python of this venv first for every subprocess

    with c.workdir(args, NAME) as work:
        t0 = time.perf_counter()
        if not args.smoke:  # imports + first MLflow DB; smoke only checks the script
            run_direct(conftest.make_project(work / "warmup", conftest.TINY_OVERRIDES))
        warm_direct = time.perf_counter() - t0
        prefect_start = warm_prefect()

        direct_proj = conftest.make_project(work / "direct", overrides)
        flow_proj = conftest.make_project(work / "flow", overrides)
        t0 = time.perf_counter()
        direct = run_direct(direct_proj)
        direct_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        flow_out = run_flow(flow_proj)
        flow_s = time.perf_counter() - t0
        epoch_s = min(epoch_seconds(flow_proj, flow_out["parent_run_id"]))
        flow_summary = [r["status"] for r in flow_out["summary"]]

        dvc = dvc_noop(conftest.make_project(work / "dvc", conftest.TINY_OVERRIDES), env)
        ml = mlflow_epoch_cost(work / "mlflow", c.pick(args, 5, 20, 20))

    overhead = flow_s / direct_s - 1
    log_frac = ml["median"] / epoch_s
    figures = [
        c.figure("stages called directly (same MLflow runs)", direct_s, "s"),
        c.figure(
            "nightly Prefect flow, same params",
            flow_s,
            "s",
            ratio=flow_s / direct_s,
            target="overhead < 5 %",
            met=overhead < 0.05,
            note=f"overhead {overhead * 100:+.1f} %; server start excluded",
        ),
        c.figure(
            "Prefect ephemeral server start (once/process)",
            prefect_start,
            "s",
            ratio=(flow_s + prefect_start) / direct_s,
            note="ratio = flow incl. this start vs direct",
        ),
        c.figure(
            "dvc repro, nothing changed",
            dvc["noop_repro"],
            "s",
            target="< 3 s",
            met=dvc["noop_repro"] < 3.0,
            note=f"`dvc version` alone {dvc['dvc_version_cmd']:.2f}s",
        ),
        c.figure(
            "MLflow epoch_logger, 20 metrics",
            ml["median"] * 1000,
            "ms/epoch",
            ratio=log_frac,
            target="< 1 % of an epoch",
            met=log_frac < 0.01,
            note=f"epoch = {epoch_s:.2f}s (flow's train)",
        ),
    ]
    conditions = {
        "overrides": overrides,
        "dvc_project": "tests/conftest.TINY_OVERRIDES",
        "prefect": "ephemeral server, PREFECT_HOME=" + os.environ.get("PREFECT_HOME", ""),
        "mlflow": "sqlite store in the project (.mmpipe/mlflow.db)",
        "order": "warm-up direct (tiny) + trivial flow, then direct, then flow",
    }
    data = {
        "direct_seconds": round(direct_s, 3),
        "flow_seconds": round(flow_s, 3),
        "overhead_fraction": round(overhead, 4),
        "prefect_server_start": round(prefect_start, 3),
        "warmup_direct_seconds": round(warm_direct, 3),
        "direct_stage_seconds": {
            k[:-8]: round(v, 3) for k, v in direct.items() if k.endswith("_seconds")
        },
        "flow_stage_status": flow_summary,
        "dvc": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in dvc.items()},
        "mlflow_log": {k: round(v, 5) for k, v in ml.items()},
        "epoch_seconds": round(epoch_s, 3),
        "log_fraction_of_epoch": round(log_frac, 6),
    }
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
