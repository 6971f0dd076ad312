"""Prefect tasks: thin wrappers of the stage drivers in `mmpipe.pipeline`.

Tasks take the params the flow validated once (a ``Params``) and the project's ``Layout``, and
return the stage's small report dict: paths and counts, never tensors or tables (Prefect
pickles the results it persists).
Each task run is named after its stage.

Data stages (ingest, curate, align, shard) are cached on *content*: the key is the stage's
fingerprint (its params section, its code, the hash of its inputs). A cached result is only
reused while the stage's outputs on disk still carry that fingerprint: `data_stage` gives the
flow the task with ``refresh_cache=True`` otherwise, so a deleted or overwritten output re-runs (and the fresh
result is stored under the same key for the next night). Prefect's default policy would key on
the flow-run id and never reuse anything across nights.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from prefect import task
from prefect.context import TaskRunContext

from mmpipe import pipeline
from mmpipe.config import Params
from mmpipe.errors import MmpipeError
from mmpipe.layout import Layout

log = logging.getLogger(__name__)


def data_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """The cache key of a data stage run: the stage, the project and the stage's fingerprint."""
    stage, layout = parameters["stage"], parameters["layout"]
    fingerprint = pipeline.stage_fingerprint(stage, parameters["params"], layout)
    # the project is part of the key: a cached report names files of one project only
    project = hashlib.sha256(str(layout.root.resolve()).encode()).hexdigest()[:12]
    return f"mmpipe-{stage}-{project}-{fingerprint}"


def retry_on_io(task_obj: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O failures only; a user's bad input fails at once."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, MmpipeError | FileNotFoundError)


_IO_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_on_io}


@task(
    name="data-stage",
    task_run_name="{stage}",
    cache_key_fn=data_cache_key,
    persist_result=True,
    **_IO_RETRIES,
)
def data_task(
    stage: str, params: Params, layout: Layout, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Data stage ``stage`` (ingest, curate, align or shard), cached on its inputs' content + params."""
    return pipeline.run_data_stage(stage, params, layout, parent_run_id=parent_run_id)


def data_stage(stage: str, params: Params, layout: Layout) -> Any:
    """``data_task``, set to ignore its cache unless the stage's outputs are current.

    Call it right before submitting the stage: currency depends on the upstream stage's outputs.
    """
    current = pipeline.stage_is_current(stage, params, layout)
    return data_task if current else data_task.with_options(refresh_cache=True)


@task(name="train", persist_result=False)
def train_task(
    params: Params, layout: Layout, parent_run_id: str | None = None, resume: bool = False
) -> dict[str, Any]:
    """Stage train: always runs (the nightly job retrains), once the register metric is known
    to be one this run can produce."""
    pipeline.check_register_metric(params, layout)
    return pipeline.stage_train(params, layout, resume=resume, parent_run_id=parent_run_id)


@task(name="model-stage", task_run_name="{stage}", persist_result=False)
def model_task(
    stage: str, params: Params, layout: Layout, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Stage evaluate or register (on the model train just made)."""
    return pipeline.run_stage(stage, params, layout, parent_run_id=parent_run_id)


@task(name="start-tracking", persist_result=False, **_IO_RETRIES)
def start_tracking_task(params: Params, layout: Layout) -> str:
    """Open the flow's MLflow parent run; returns its id (stage runs nest under it)."""
    return pipeline.open_flow_run(params, layout)


@task(name="publish", persist_result=False, **_IO_RETRIES)
def publish_task(
    params: Params,
    layout: Layout,
    parent_run_id: str,
    results: dict[str, Any],
    timings: dict[str, float],
    params_file: str,
    overrides: list[str],
) -> dict[str, str]:
    """The night's headline metrics on the parent run, and the morning report (reports/)."""
    from mmpipe.publish import publish_flow_run

    return publish_flow_run(
        params, layout, parent_run_id, results,
        timings=timings, params_file=params_file, overrides=overrides,
    )  # fmt: skip


@task(name="finish-tracking", persist_result=False, **_IO_RETRIES)
def finish_tracking_task(
    params: Params, layout: Layout, run_id: str, status: str, summary: str
) -> None:
    """Close the parent run with the flow's status and its summary table."""
    pipeline.close_flow_run(params, layout, run_id, status, summary)
