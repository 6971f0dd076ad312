"""A night's result in MLflow: headline metrics on the flow's parent run, a version's model card,
and what a registered version scored (to compare against the champion).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from mmpipe.config import TrackingParams
from mmpipe.tracking.runs import log_metrics, numeric
from mmpipe.tracking.store import connect

TEST_PREFIX = "test."


def log_flow_results(
    p: TrackingParams | None,
    root: str | Path,
    run_id: str,
    metrics: Mapping[str, Any],
    *,
    promoted: bool | None,
    extra: Mapping[str, float] | None = None,
) -> int:
    """Log a night's result on the flow's parent run: the evaluation metrics under the same
    ``test.*`` names as the train run, ``promoted`` (1.0/0.0) and ``extra`` (e.g. the best
    validation metric); returns how many. The runs page shows one row per night from these.
    """
    run = connect(p, root).run(run_id)
    values: dict[str, Any] = {"test": dict(metrics), **dict(extra or {})}
    if promoted is not None:
        values["promoted"] = 1.0 if promoted else 0.0
    return log_metrics(run, values)


def version_info(
    p: TrackingParams | None, root: str | Path, name: str, version: int | str | None
) -> dict[str, Any] | None:
    """What a registered version scored and was trained with; None if there is no such version.

    ``metrics``: its training run's ``test.*`` metrics (full precision, prefix dropped);
    ``params``: that run's params (flattened params.yaml, ``git.commit``, the data hash).
    """
    if version is None:
        return None
    client = connect(p, root).client
    try:
        v = client.get_model_version(name, str(version))
        run = client.get_run(v.run_id)
    except MlflowException:
        return None
    metrics = {
        k[len(TEST_PREFIX) :]: value
        for k, value in run.data.metrics.items()
        if k.startswith(TEST_PREFIX)
    }
    return {
        "version": int(v.version),
        "run_id": v.run_id,
        "metrics": metrics,
        "params": dict(run.data.params),
        "tags": dict(v.tags),
        "created_ms": v.creation_timestamp,
    }


def describe_version(
    p: TrackingParams | None, root: str | Path, name: str, version: int, card: str
) -> None:
    """Set a registered version's description (the MLflow UI renders it as Markdown)."""
    connect(p, root).client.update_model_version(name, str(version), description=card)


def rounded_tags(scores: Mapping[str, Any], keys: list[str], digits: int = 4) -> dict[str, str]:
    """``keys`` of the numeric ``scores``, as tags of ``digits`` significant digits."""
    flat = numeric(scores)
    return {k: f"{flat[k]:.{digits}g}" for k in keys if k in flat}
