"""Runs: open and close them (nested across processes), log params, metrics and artifacts.

Runs nest across processes: a flow opens its parent with ``open_parent_run`` and hands the id
to each stage, either explicitly (``parent_run_id=``) or through the environment variable
``MMPIPE_PARENT_RUN_ID`` (which ``start_run(..., export_parent=True)`` sets for child
processes). Each stage then opens its own nested run.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)
from pydantic import BaseModel

from mmpipe.config import Params, TrackingParams, flatten
from mmpipe.errors import InputError
from mmpipe.signals import Interrupted
from mmpipe.tracking.store import Run, Store, connect, owner_tags

PARENT_ENV = "MMPIPE_PARENT_RUN_ID"


def create_run(
    store: Store,
    name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    start_time: int | None = None,
) -> Run:
    """A new RUNNING run, nested under ``parent_run_id``, with MLflow's source/user tags;
    ``start_time`` (ms since the epoch) when it started before now."""
    tags = {**owner_tags(), **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    created = store.client.create_run(
        store.experiment_id, start_time=start_time, run_name=name, tags=resolve_tags(tags)
    )
    return store.run(created.info.run_id)


@contextlib.contextmanager
def start_run(
    p: TrackingParams | None,
    root: str | Path,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    export_parent: bool = False,
) -> Iterator[Run]:
    """Open a run (nested under ``parent_run_id`` or env MMPIPE_PARENT_RUN_ID) for the block.

    With ``export_parent=True`` the run id is put in MMPIPE_PARENT_RUN_ID for the duration, so
    stages started as subprocesses nest under it. The run ends FINISHED, or FAILED (KILLED on
    Ctrl-C or SIGTERM: ``signals.Interrupted``) if the block raises.
    """
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    run = create_run(connect(p, root), run_name, parent, tags)
    saved = os.environ.get(PARENT_ENV)
    if export_parent:
        os.environ[PARENT_ENV] = run.id
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, Interrupted):
        status = "KILLED"
        raise
    finally:
        if export_parent:
            if saved is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = saved
        run.client.set_terminated(run.id, status=status)


def open_parent_run(
    p: TrackingParams | None,
    root: str | Path,
    params: Params | None = None,
    *,
    run_name: str = "nightly",
) -> str:
    """Create a flow's parent run and return its id; stages nest under it by id.

    It stays RUNNING across tasks and processes until ``close_parent_run``. Creating it also
    creates the SQLite DB, before any stage runs in parallel.
    """
    run = create_run(connect(p, root), run_name, tags={"mmpipe.kind": "flow"})
    if params is not None:
        log_params(run, params)
    return run.id


def close_parent_run(
    p: TrackingParams | None,
    root: str | Path,
    run_id: str,
    status: str = "FINISHED",
    summary: str = "",
) -> None:
    """End a parent run with ``status`` (FINISHED / FAILED / KILLED), keeping ``summary.txt``."""
    client = connect(p, root).client
    if summary:
        client.log_text(run_id, summary, "summary.txt")
    client.set_terminated(run_id, status=status)


def git_commit(path: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the code (read-only); "unknown" outside a git checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def log_params(
    run: Run, params: BaseModel, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Log flattened params + ``git.commit`` + ``extra`` (e.g. the data manifest hash)."""
    flat: dict[str, Any] = flatten(params)
    flat["git.commit"] = git_commit()
    flat.update(extra or {})
    _log_flat_params(run, flat)
    return flat


def _log_flat_params(run: Run, flat: Mapping[str, Any]) -> None:
    """The one way params are logged: None as "null", values cut to MLflow's limit, batched."""
    items = [
        Param(k, "null" if v is None else str(v)[:MAX_PARAM_VAL_LENGTH])
        for k, v in sorted(flat.items())
    ]
    for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
        batch = items[i : i + MAX_PARAMS_TAGS_PER_BATCH]
        run.client.log_batch(run.id, params=batch, synchronous=True)


def numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to dotted keys, keeping finite numbers (bools excluded)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric(value, f"{name}."))
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ):
            out[name] = float(value)
    return out


def log_metrics(run: Run, metrics: Mapping[str, Any], step: int = 0) -> int:
    """Log every finite numeric value of ``metrics`` in batched calls; returns how many."""
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, step) for k, v in numeric(metrics).items()]
    for i in range(0, len(items), MAX_METRICS_PER_BATCH):
        batch = items[i : i + MAX_METRICS_PER_BATCH]
        run.client.log_batch(run.id, metrics=batch, synchronous=True)
    return len(items)


def epoch_logger(run: Run) -> Callable[[int, Mapping[str, Any]], None]:
    """A callback ``(epoch, metrics)`` logging one epoch's metrics in ONE log_batch call."""

    def on_epoch_end(epoch: int, metrics: Mapping[str, Any]) -> None:
        log_metrics(run, metrics, step=int(epoch))

    return on_epoch_end


def log_artifacts(run: Run, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents to the run's artifacts."""
    path = Path(path)
    if path.is_dir():
        run.client.log_artifacts(run.id, str(path), artifact_path)
    elif path.is_file():
        run.client.log_artifact(run.id, str(path), artifact_path)
    else:
        raise InputError(f"{path}: no such file or directory to log as an MLflow artifact")


def log_stage_run(
    p: TrackingParams | None,
    root: str | Path,
    *,
    stage: str,
    parent_run_id: str,
    section: BaseModel | Mapping[str, Any],
    report: Mapping[str, Any],
    report_file: str | Path | None = None,
    started: float | None = None,
) -> str:
    """Record a finished data stage as a run nested under the flow's run; returns its id.

    Params = the stage's params section (flattened, ``<stage>.`` prefix), metrics = the numeric
    counts of its report (``seen``, ``accepted``, ...), artifact = its report file. ``started``
    (``time.time()`` when the stage began) makes the run's duration the stage's.
    """
    store = connect(p, root)
    tags = {"mmpipe.kind": "stage", "mmpipe.stage": stage}
    start_ms = None if started is None else int(started * 1000)
    run = create_run(store, stage, parent_run_id, tags, start_time=start_ms)
    _log_flat_params(run, flatten(section, f"{stage}."))
    log_metrics(run, report)
    if report_file is not None and Path(report_file).is_file():
        log_artifacts(run, report_file)
    run.client.set_terminated(run.id, status="FINISHED")
    return run.id


def log_evaluation(
    p: TrackingParams | None,
    root: str | Path,
    run_id: str,
    metrics: Mapping[str, Any],
    eval_dir: str | Path,
) -> None:
    """Log evaluation metrics (prefixed ``test.``) and the reports directory to ``run_id``."""
    run = connect(p, root).run(run_id)
    log_metrics(run, {"test": dict(metrics)})
    if Path(eval_dir).is_dir():
        log_artifacts(run, eval_dir, "evaluation")
