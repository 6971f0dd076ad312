"""Prefect tasks: thin wrappers of the stage drivers in `mmpipe.pipeline`.

Tasks take plain JSON-able arguments (the validated params as a dict, the project directory) and
return the stage's small report dict: paths and counts, never tensors or tables (TRAPS.md).

Data stages (ingest, align, shard) are cached on *content*: the key is the stage's fingerprint
(its params section, its code, the hash of its inputs). A cached result is only reused while
the stage's outputs on disk still carry that fingerprint: `data_stage` gives the flow the task
with ``refresh_cache=True`` otherwise, so a deleted or overwritten output re-runs (and the fresh
result is stored under the same key for the next night). Prefect's default policy would key on
the flow-run id and never reuse anything across nights.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from mmpipe import pipeline
from mmpipe.config import Params
from mmpipe.errors import MmpipeError
from mmpipe.layout import Layout

log = logging.getLogger(__name__)


def _params(params: dict[str, Any]) -> Params:
    return Params.model_validate(params)


def _layout(project_dir: str) -> Layout:
    return Layout(Path(project_dir))


def data_cache_key(stage: str):
    """A cache_key_fn for data stage `stage` (see module docstring)."""

    def key_fn(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        params = _params(parameters["params"])
        layout = _layout(parameters["project_dir"])
        fingerprint = pipeline.stage_fingerprint(stage, params, layout)
        # the project is part of the key: a cached report names files of one project only
        project = hashlib.sha256(str(layout.root.resolve()).encode()).hexdigest()[:12]
        return f"mmpipe-{stage}-{project}-{fingerprint}"

    return key_fn


def data_stage(stage: str, params: dict[str, Any], project_dir: str) -> Any:
    """The task of data stage ``stage``, set to ignore its cache unless its outputs are current.

    Call it right before submitting the stage: currency depends on the upstream stage's outputs.
    """
    tasks = {"ingest": ingest_task, "align": align_task, "shard": shard_task}
    current = pipeline.stage_is_current(stage, _params(params), _layout(project_dir))
    return tasks[stage] if current else tasks[stage].with_options(refresh_cache=True)


def retry_on_io(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O failures only; a user's bad input fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, MmpipeError | FileNotFoundError)


_IO_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_io}


@task(name="ingest", cache_key_fn=data_cache_key("ingest"), persist_result=True, **_IO_RETRIES)
def ingest_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage ingest (cached on source content + params)."""
    return pipeline.stage_ingest(_params(params), _layout(project_dir), parent_run_id=parent_run_id)


@task(name="align", cache_key_fn=data_cache_key("align"), persist_result=True, **_IO_RETRIES)
def align_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage align (cached on the ingest tables + params)."""
    return pipeline.stage_align(_params(params), _layout(project_dir), parent_run_id=parent_run_id)


@task(name="shard", cache_key_fn=data_cache_key("shard"), persist_result=True, **_IO_RETRIES)
def shard_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage shard (cached on the pairs table + params)."""
    return pipeline.stage_shard(_params(params), _layout(project_dir), parent_run_id=parent_run_id)


@task(name="train", persist_result=False)
def train_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None, resume: bool = False
) -> dict[str, Any]:
    """Stage train: always runs (the nightly job retrains)."""
    return pipeline.stage_train(
        _params(params), _layout(project_dir), resume=resume, parent_run_id=parent_run_id
    )


@task(name="evaluate", persist_result=False)
def evaluate_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage evaluate on the test split."""
    return pipeline.stage_evaluate(_params(params), _layout(project_dir), parent_run_id=parent_run_id)


@task(name="register", persist_result=False)
def register_task(
    params: dict[str, Any], project_dir: str, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage register: new model version; the champion alias moves only on improvement."""
    return pipeline.stage_register(_params(params), _layout(project_dir), parent_run_id=parent_run_id)


@task(name="start-tracking", persist_result=False, **_IO_RETRIES)
def start_tracking_task(params: dict[str, Any], project_dir: str) -> str:
    """Open the flow's MLflow parent run; returns its id (stage runs nest under it)."""
    return pipeline.open_flow_run(_params(params), _layout(project_dir))


@task(name="finish-tracking", persist_result=False, **_IO_RETRIES)
def finish_tracking_task(
    params: dict[str, Any], project_dir: str, run_id: str, status: str, summary: str
) -> None:
    """Close the parent run with the flow's status and its summary table."""
    pipeline.close_flow_run(_params(params), _layout(project_dir), run_id, status, summary)
