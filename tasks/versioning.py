"""Record the flow's outputs with DVC, so `dvc status` is clean and `dvc repro` a no-op after it.

The decision (docs/restore.md, "Reproducing a stage"): the flow runs the stage functions itself (Prefect
retries, caching, MLflow runs per stage) and then *records* what it made with ``dvc commit``,
exactly as if ``dvc repro`` had made it: ``dvc.lock`` gets each stage's code, params and output
hashes, and the outputs go into the DVC cache. Running the stages through ``dvc repro`` instead
would hide them from Prefect (one opaque task: no per-stage retries, caching or MLflow runs).

A stage is recorded only when ``dvc.lock`` would tell the truth about it: the project is a DVC
project, the stage finished in this flow run, and the params the flow used for it are those in
``params.yaml`` (the file ``dvc.yaml`` reads), and so were those of every stage it reads from. A
run with ``--set train.epochs=2`` records ingest, align and shard but not train and evaluate, so
`dvc status` shows those as changed: they are, relative to params.yaml.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

from prefect import task

from mmpipe.config import Params, ParamsError, load_params
from mmpipe.layout import STAGES, Layout

log = logging.getLogger(__name__)

DVC_PARAMS = "params.yaml"  # dvc.yaml's default params file
DVC_STAGES = tuple(name for name, spec in STAGES.items() if spec.out is not None)


def unrecordable(params: Params, layout: Layout) -> dict[str, str]:
    """Why each DVC stage cannot be recorded for a flow run with ``params`` (empty: all can)."""
    root = layout.root
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return dict.fromkeys(DVC_STAGES, f"{root} is not a DVC project (no .dvc/ or dvc.yaml)")
    try:
        declared = load_params(root / DVC_PARAMS)
    except (ParamsError, OSError) as exc:
        return dict.fromkeys(DVC_STAGES, f"{DVC_PARAMS}: {exc}")
    reasons = {}
    for stage in DVC_STAGES:
        changed = [s for s in STAGES[stage].params if getattr(params, s) != getattr(declared, s)]
        if changed:
            reasons[stage] = f"params differ from {DVC_PARAMS} in section(s) {', '.join(changed)}"
    return reasons


def _feeds(upstream: str, stage: str) -> bool:
    """Whether ``stage`` reads an output of ``upstream``."""
    out = STAGES[upstream].out
    return out is not None and any(
        i == out or i.startswith(f"{out}/") for i in STAGES[stage].inputs
    )


def record_outputs(params: Params, layout: Layout, finished: list[str]) -> dict[str, Any]:
    """``dvc commit`` the finished stages that can be recorded; what was recorded and what not."""
    skipped = {s: "did not finish in this run" for s in DVC_STAGES if s not in finished}
    skipped.update({s: r for s, r in unrecordable(params, layout).items() if s not in skipped})
    for stage in DVC_STAGES:  # in DAG order: a stage fed by an unrecorded one is not recorded
        upstream = [s for s in skipped if s != stage and _feeds(s, stage)]
        if upstream and stage not in skipped:
            skipped[stage] = f"its input comes from {', '.join(upstream)}, not recorded"
    stages = [s for s in DVC_STAGES if s not in skipped]
    for stage, reason in skipped.items():
        log.info("dvc: %s not recorded in dvc.lock: %s", stage, reason)
    if stages:
        cmd = [sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stages]
        proc = subprocess.run(cmd, cwd=layout.root, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"`dvc commit {' '.join(stages)}` failed: {proc.stderr.strip()}")
        log.info("dvc: recorded %s in dvc.lock and the DVC cache", ", ".join(stages))
    return {"recorded": stages, "skipped": skipped}


@task(name="dvc-record", persist_result=False)
def record_outputs_task(params: Params, layout: Layout, finished: list[str]) -> dict[str, Any]:
    """Record the flow's outputs in dvc.lock (see the module docstring)."""
    return record_outputs(params, layout, finished)
