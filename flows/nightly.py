"""The nightly retraining flow: ingest → align → shard → train → evaluate → register.

    python -m flows.nightly [--params params.yaml] [--set section.key=value ...] [--project-dir .]

Data stages are skipped when their inputs and params are unchanged (content-keyed cache, see
tasks/stages.py); train, evaluate and register always run. One MLflow parent run per flow run,
with a nested run per stage; the parent run gets the night's headline metrics (``test.*``,
``promoted``) and the morning report (``reports/report.html``). The outputs are then recorded
with DVC (``dvc.lock``, tasks/versioning.py), so `dvc status` is clean and `dvc repro` a no-op
after the flow. If a stage fails, later stages do not run (so nothing is promoted), and the flow
logs a summary table of every stage before it fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mmpipe.config import Params, ParamsError, add_params_arguments, load_params, params_from_args
from mmpipe.config import params_file as params_path  # `params_file` is the flow parameter
from mmpipe.layout import Layout
from mmpipe.pipeline import DATA_STAGES, ORDER
from tasks.stages import (
    data_stage,
    finish_tracking_task,
    model_task,
    publish_task,
    start_tracking_task,
    train_task,
)
from tasks.versioning import record_outputs_task


class StageFailed(RuntimeError):
    """A stage of the nightly flow failed; the message is the flow's summary table."""


def summary_table(rows: list[dict[str, str]]) -> str:
    """One line per stage: its status, its time and the figures that matter."""
    lines = [f"{'stage':<10} {'status':<10} {'time':>7}  detail"]
    lines += [
        f"{r['stage']:<10} {r['status']:<10} {r.get('time', ''):>7}  {r['detail']}" for r in rows
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def record_detail(recorded: dict[str, Any]) -> str:
    """The summary line of the DVC record: which stages dvc.lock now vouches for, which not."""
    done, skipped = recorded["recorded"], recorded["skipped"]
    text = f"dvc.lock records {', '.join(done)}" if done else "nothing recorded in dvc.lock"
    for reason in sorted(set(skipped.values())):
        text += f"; not {', '.join(s for s, r in skipped.items() if r == reason)}: {reason}"
    return text


def after_row(name: str, state: Any, describe: Callable[[Any], str]) -> dict[str, str]:
    """The summary line of a step after the stages; its failure is reported, not raised: the
    model is trained, evaluated and registered by then."""
    if state.is_failed() or state.is_crashed():
        exc = state.result(raise_on_failure=False)
        return {"stage": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"}
    return {"stage": name, "status": "done", "detail": describe(state.result())}


def _counts(kind: dict[str, Any]) -> str:
    return f"{kind['accepted']}/{kind['seen']} accepted"


def detail(stage: str, result: dict[str, Any]) -> str:
    """The summary line of a stage's report: counts, the best validation metric, test scores."""
    if stage == "ingest":
        return f"images {_counts(result['images'])}, captions {_counts(result['captions'])}"
    if stage == "train":
        best = result.get("selection_metric", "val_accuracy")
        parts = {"epochs": result["epochs_completed"], f"best {best}": result["best_metric"]}
    else:
        keys = {
            "align": ("pairs", "orphan_images", "orphan_captions"),
            "shard": ("samples", "shards"),
            "evaluate": (_headline(result), "i2t_r1", "t2i_r1"),
            "register": ("version", "promoted", "champion_version"),
        }[stage]
        parts = {k: result[k] for k in keys if k in result}
    return ", ".join(f"{k}={_fmt(v)}" for k, v in parts.items())


def _headline(metrics: dict[str, Any]) -> str:
    """The task's main test metric in evaluate's metrics (mean_r1 without labels)."""
    keys = ("accuracy", "vqa_accuracy", "map", "rmse", "mean_r1")
    return next((k for k in keys if k in metrics), "mean_r1")


@flow(name="mmpipe-nightly")
def nightly(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    resume: bool = False,
    params: Params | None = None,
) -> dict[str, Any]:
    """Run the whole DAG once; returns where to look (UI command, report, champion version).

    ``params``: params already validated by the caller (the CLI); otherwise they are read from
    ``params_file`` (relative to ``project_dir``) + ``overrides``, as scheduled runs do.
    """
    logger = get_run_logger()
    layout = Layout(Path(project_dir).resolve())
    if params is None:
        params = load_params(params_path(params_file, layout.root), overrides)
    parent = start_tracking_task(params, layout)
    rows: list[dict[str, str]] = []
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}  # seconds per stage: for the log, MLflow and the report only
    failed = False
    for name in ORDER:
        started = time.perf_counter()
        if failed:
            rows.append({"stage": name, "status": "not run", "detail": "an earlier stage failed"})
            continue
        if name in DATA_STAGES:  # reuse the cached result only while outputs are current
            task = data_stage(name, params, layout)
            state = task(name, params, layout, parent_run_id=parent, return_state=True)
        elif name == "train":
            state = train_task(
                params, layout, parent_run_id=parent, resume=resume, return_state=True
            )
        else:
            state = model_task(name, params, layout, parent_run_id=parent, return_state=True)
        if state.is_failed() or state.is_crashed():
            failed = True
            exc = state.result(raise_on_failure=False)
            rows.append(
                {"stage": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"}
            )
            continue
        results[name] = state.result()
        timings[name] = round(time.perf_counter() - started, 1)
        status = "skipped" if state.name == "Cached" else "done"
        if status == "skipped":
            logger.info("%s: inputs and params unchanged, skipped (cached)", name)
        rows.append(
            {"stage": name, "status": status, "time": f"{timings[name]:.1f}s",
             "detail": detail(name, results[name])}
        )  # fmt: skip
    if not failed:
        report = publish_task(
            params, layout, parent, results, timings, params_file, list(overrides or []),
            return_state=True,
        )  # fmt: skip
        rows.append(after_row("report", report, lambda r: f"{r['html']}"))
    recorded = record_outputs_task(params, layout, list(results), return_state=True)
    rows.append(after_row("dvc", recorded, record_detail))
    table = summary_table(rows)
    finish_tracking_task(params, layout, parent, "FAILED" if failed else "FINISHED", table)
    logger.info("nightly summary\n%s", table)
    if failed:
        raise StageFailed(f"nightly flow failed; nothing was promoted\n{table}")
    return {
        "parent_run_id": parent,
        "summary": rows,
        "ui": f"mmpipe ui --project-dir {layout.root}",
        "report": str(layout.eval_dir / "report.html"),
        **{k: results["register"].get(k) for k in ("version", "champion_version", "promoted")},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI of `python -m flows.nightly` (what `make run` calls)."""
    ap = argparse.ArgumentParser(prog="python -m flows.nightly", description=__doc__.split("\n")[0])
    add_params_arguments(ap)
    ap.add_argument("--resume", action="store_true", help="continue training from models/last.pt")
    args = ap.parse_args(argv)
    try:  # a bad params file or --set fails here, in one line, before any flow run starts
        params = params_from_args(args)
    except ParamsError as exc:
        print(f"python -m flows.nightly: error: {exc}", file=sys.stderr)
        return 2
    try:
        out = nightly(args.params, args.overrides, args.project_dir, args.resume, params)
    except StageFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    champion = out.get("champion_version")
    print(
        "\nmmpipe nightly: done\n"
        f"  MLflow UI:  make ui   (= .venv/bin/{out['ui']}; open the runs page it prints)\n"
        f"  report:     {out['report']} (metrics.json and plots/ beside it)\n"
        f"  model:      version {out.get('version')} registered; champion is version {champion}"
        f" ({'promoted' if out.get('promoted') else 'not promoted'})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
