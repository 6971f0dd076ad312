"""The model registry: a version per trained model; the alias moves only on improvement.

The registry uses aliases only (stages are deprecated): ``register_and_maybe_promote`` moves the
alias (``champion``) when the new version's metric beats the champion version's tagged metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mmpipe.config import RegisterParams
from mmpipe.errors import InputError
from mmpipe.modelcard import HEADLINE_METRICS
from mmpipe.objectives import metric_of
from mmpipe.tracking.results import rounded_tags
from mmpipe.tracking.runs import numeric
from mmpipe.tracking.store import Run, point_fluent_api_at

log = logging.getLogger(__name__)


def _champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_value(version: Any, metric: str) -> float | None:
    tag = version.tags.get(metric)
    return float(tag) if tag is not None else None


def _is_better(new: float, old: float | None, greater_is_better: bool) -> bool:
    if old is None or math.isnan(old):
        return True
    return new > old if greater_is_better else new < old


def register_and_maybe_promote(
    run: Run,
    model_uri: str,
    metrics: Mapping[str, Any],
    p: RegisterParams,
    *,
    data_hash: str | None = None,
) -> dict[str, Any]:
    """A new version of ``p.model_name``, tagged with metrics; the alias moves only on improvement.

    The first version becomes champion. The comparison reads the champion version's own tag
    named after the metric (what it scored when registered); a champion without that tag is
    replaced. A tie (at the tags' 4 significant digits) does not move the alias. Both scores
    should come from the same test split: when the champion's ``data_hash`` tag differs, the
    result says so (``same_data: false``) and a warning is logged, but the comparison still
    decides.
    """
    scores = numeric(metrics)
    if p.metric is None or p.greater_is_better is None:  # the pipeline resolves them per task
        p = p.model_copy(update=dict(zip(("metric", "greater_is_better"),
                                         metric_of(p.metric, p.greater_is_better, scores),
                                         strict=True)))  # fmt: skip
    if p.metric not in scores:
        raise InputError(
            f"metrics have no numeric {p.metric!r} (register.metric); available: {sorted(scores)}"
        )
    value, client = scores[p.metric], run.client
    champion = _champion(client, p.model_name, p.alias)
    # a few headline numbers, rounded as people read them (the run keeps every metric in full);
    # the champion is compared at this precision too, so a tag never disagrees with a decision
    tags = rounded_tags(scores, [p.metric, *HEADLINE_METRICS])
    tags["data_hash"] = data_hash or "unknown"
    # the client has no one-call equivalent (create the model if new, resolve a logged model's
    # URI, wait until READY): the fluent function, pointed at the run's store
    point_fluent_api_at(run.store)
    version = mlflow.register_model(model_uri, p.model_name, tags=tags)
    old = _champion_value(champion, p.metric) if champion is not None else None
    promoted = _is_better(float(tags[p.metric]), old, p.greater_is_better)
    same_data = champion is None or champion.tags.get("data_hash") == (data_hash or "unknown")
    if not same_data:
        log.warning("champion v%s was scored on other data; comparing anyway", champion.version)
    if promoted:
        client.set_registered_model_alias(p.model_name, p.alias, version.version)
    log.info(
        "registered %s v%s (%s=%.4f, champion %s): %s",
        *(p.model_name, version.version, p.metric, value, old),
        "promoted" if promoted else "alias unchanged",
    )
    return {
        "model_name": p.model_name,
        "version": int(version.version),
        "model_uri": model_uri,
        "alias": p.alias,
        "promoted": promoted,
        "metric": p.metric,
        "value": value,
        "previous_champion_version": int(champion.version) if champion is not None else None,
        "previous_champion_value": old,
        "champion_version": int(version.version) if promoted else int(champion.version),
        "same_data": same_data,
    }
