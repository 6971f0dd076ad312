"""The nightly retraining flow: ingest → align → shard → train → evaluate → register.

    python -m flows.nightly [--params params.yaml] [--set section.key=value ...] [--project-dir .]

Data stages are skipped when their inputs and params are unchanged (content-keyed cache, see
tasks/stages.py); train, evaluate and register always run. One MLflow parent run per flow run,
with a nested run per stage. If a stage fails, later stages do not run (so nothing is promoted),
and the flow logs a summary table of every stage before it fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from mmpipe.config import ParamsError, load_params
from mmpipe.config import params_file as params_path  # `params_file` is the flow parameter
from tasks.stages import (
    align_task,
    data_stage,
    evaluate_task,
    finish_tracking_task,
    ingest_task,
    register_task,
    shard_task,
    start_tracking_task,
    train_task,
)

DATA_STAGES = (("ingest", ingest_task), ("align", align_task), ("shard", shard_task))
MODEL_STAGES = (("train", train_task), ("evaluate", evaluate_task), ("register", register_task))


class StageFailed(RuntimeError):
    """A stage of the nightly flow failed; the message is the flow's summary table."""


def _summary_table(rows: list[dict[str, str]]) -> str:
    lines = [f"{'stage':<10} {'status':<10} detail"]
    lines += [f"{r['stage']:<10} {r['status']:<10} {r['detail']}" for r in rows]
    return "\n".join(lines)


def _detail(stage: str, result: dict[str, Any]) -> str:
    keys = {
        "ingest": ("images", "captions"),
        "align": ("pairs", "orphan_images", "orphan_captions"),
        "shard": ("samples", "shards"),
        "train": ("epochs", "best_val_accuracy"),
        "evaluate": ("accuracy", "i2t_r1", "t2i_r1"),
        "register": ("version", "promoted"),
    }[stage]
    parts = [f"{k}={result[k]}" for k in keys if k in result]
    return ", ".join(parts)


@flow(name="mmpipe-nightly")
def nightly(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    project_dir: str = ".",
    resume: bool = False,
) -> dict[str, Any]:
    """Run the whole DAG once; returns where to look (UI command, report, champion version)."""
    logger = get_run_logger()
    project = Path(project_dir).resolve()
    params = load_params(params_path(params_file, project), overrides)
    pdict, proj = params.model_dump(mode="json"), str(project)
    parent = start_tracking_task(pdict, proj)
    rows: list[dict[str, str]] = []
    results: dict[str, Any] = {}
    failed = False
    for name, stage_task in DATA_STAGES + MODEL_STAGES:
        if failed:
            rows.append({"stage": name, "status": "not run", "detail": "an earlier stage failed"})
            continue
        extra: dict[str, Any] = {"parent_run_id": parent}  # each stage nests its MLflow run
        if name == "train":
            extra["resume"] = resume
        if name in dict(DATA_STAGES):  # reuse the cached result only while outputs are current
            stage_task = data_stage(name, pdict, proj)
        state = stage_task(pdict, proj, return_state=True, **extra)
        if state.is_failed() or state.is_crashed():
            failed = True
            exc = state.result(raise_on_failure=False)
            rows.append({"stage": name, "status": "FAILED", "detail": f"{type(exc).__name__}: {exc}"})
            continue
        results[name] = state.result()
        status = "skipped" if state.name == "Cached" else "done"
        if status == "skipped":
            logger.info("%s: inputs and params unchanged, skipped (cached)", name)
        rows.append({"stage": name, "status": status, "detail": _detail(name, results[name])})
    table = _summary_table(rows)
    finish_tracking_task(pdict, proj, parent, "FAILED" if failed else "FINISHED", table)
    logger.info("nightly summary\n%s", table)
    if failed:
        raise StageFailed(f"nightly flow failed; nothing was promoted\n{table}")
    return {
        "parent_run_id": parent,
        "summary": rows,
        "ui": f"mmpipe ui --project-dir {proj}",
        "report": str(project / "reports"),
        **{k: results["register"].get(k) for k in ("version", "champion_version", "promoted")},
    }


def main(argv: list[str] | None = None) -> int:
    """CLI of `python -m flows.nightly` (what `make run` calls)."""
    ap = argparse.ArgumentParser(prog="python -m flows.nightly", description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--project-dir", default=".")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    try:  # a bad params file or --set fails here, in one line, before any flow run starts
        load_params(params_path(args.params, args.project_dir), args.overrides)
    except ParamsError as exc:
        print(f"python -m flows.nightly: error: {exc}", file=sys.stderr)
        return 2
    try:
        out = nightly(args.params, args.overrides, args.project_dir, args.resume)
    except StageFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    champion = out.get("champion_version")
    print(
        "\nmmpipe nightly: done\n"
        f"  MLflow UI:  make ui   (= .venv/bin/{out['ui']}; open the runs page it prints)\n"
        f"  reports:    {out['report']}/ (metrics.json, report.md, plots/)\n"
        f"  model:      version {out.get('version')} registered; champion is version {champion}"
        f" ({'promoted' if out.get('promoted') else 'not promoted'})"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
