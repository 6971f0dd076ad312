"""The model registry: a version per trained model; the alias moves only on improvement.

The registry uses aliases only (stages are deprecated). ``register_and_maybe_promote`` registers
a new version, then moves the alias (``champion``) by compare-and-set: under a lock it re-reads
the champion and its score, compares, and moves the alias, so two registrations racing for the
alias end as if they had run one after the other. What the lock is:

* SQLite store: ``flock`` on ``<db>.registry.lock`` beside the database (one host).
* PostgreSQL store: ``pg_advisory_xact_lock`` on a key derived from the model name, taken in a
  transaction on the same database, so every host registering to it is serialised.
* A tracking server (``http(s)://``): MLflow's REST API offers no lock or conditional alias
  update. A warning is logged; serialise registrations outside mmpipe (one scheduler, or a
  Prefect global concurrency limit around the register task).

Scores are compared on the same test split only: a champion tagged with another ``data_hash``
is re-scored on this run's test split (``rescore``, evaluate's machinery) and both numbers are
kept in the result and the new version's tags; if it cannot be re-scored, the alias stays and
the result says why.

Before any comparison, the new version must clear chance: its metric must beat the chance level
evaluate wrote for it by ``register.chance_margin`` (``objectives.chance_bar``). A version at
chance is registered without the alias (the first one too) and its ``not_promoted_because`` tag
says why.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mmpipe.config import RegisterParams
from mmpipe.errors import InputError
from mmpipe.faults import fault_point
from mmpipe.layout import sqlite_path
from mmpipe.modelcard import HEADLINE_METRICS
from mmpipe.objectives import chance_bar, chance_level, metric_of
from mmpipe.tracking.models import fetch_model
from mmpipe.tracking.results import rounded_tags
from mmpipe.tracking.runs import numeric
from mmpipe.tracking.store import (
    Run,
    Store,
    file_lock,
    is_postgres,
    pg_advisory_lock,
    point_fluent_api_at,
)

log = logging.getLogger(__name__)

Rescore = Callable[[Path], Mapping[str, float]]


def _champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _is_better(new: float, old: float | None, greater_is_better: bool) -> bool:
    if old is None or math.isnan(old):
        return True
    return new > old if greater_is_better else new < old


@contextlib.contextmanager
def promotion_lock(store: Store, model_name: str) -> Iterator[str]:
    """Serialise alias moves of ``model_name`` on ``store``; yields what guards it."""
    db = sqlite_path(store.uri)
    if db is not None:
        with file_lock(db.with_name(db.name + ".registry.lock")):
            yield "file lock"
        return
    if is_postgres(store.uri):
        with pg_advisory_lock(store.uri, f"mmpipe:{model_name}"):
            yield "pg_advisory_xact_lock"
        return
    log.warning(
        "%s: no lock is possible through a tracking server; serialise `mmpipe register` runs "
        "(e.g. a Prefect global concurrency limit) or two may both move the alias",
        store.uri,
    )
    yield "none"


@dataclass
class Comparison:
    """How the new version was compared with the champion, and the outcome."""

    promoted: bool
    old: float | None  # the champion's score the decision used (None: no champion)
    basis: str  # first | same_data | rescored | refused | chance
    reason: str = ""
    tagged: float | None = None  # the champion's score as tagged when it was registered


def compare(
    champion: Any | None,
    value: float,
    p: RegisterParams,
    data_hash: str,
    rescore: Rescore | None,
    store: Store,
) -> Comparison:
    """Decide on the same test split: the champion's tag if it was scored on this data, else its
    score on this data (re-scored now), else no promotion."""
    if champion is None:
        return Comparison(True, None, "first")
    tag = champion.tags.get(p.metric)
    tagged = float(tag) if tag is not None else None
    if champion.tags.get("data_hash") == data_hash and data_hash != "unknown":
        return Comparison(_is_better(value, tagged, p.greater_is_better), tagged, "same_data")
    reason = f"champion v{champion.version} was scored on other data"
    if rescore is None:
        return Comparison(False, tagged, "refused", f"{reason}; nothing to re-score it with")
    try:
        checkpoint, _ = fetch_model(store, f"models:/{p.model_name}/{champion.version}")
        scores = numeric(rescore(checkpoint))
    except InputError as exc:
        return Comparison(False, tagged, "refused", f"{reason} and cannot be re-scored: {exc}")
    if p.metric not in scores:
        why = f"{reason} and re-scoring it gives no {p.metric!r}"
        return Comparison(False, tagged, "refused", why)
    old = scores[p.metric]
    return Comparison(_is_better(value, old, p.greater_is_better), old, "rescored", tagged=tagged)


@dataclass
class Chance:
    """The register metric's chance level on this test split and the bar it must clear."""

    level: float | None  # None: evaluate wrote no chance level for the metric (or no check)
    bar: float | None
    reason: str = ""  # why the version does not clear it ("" when it does, or no check)


def check_chance(value: float, scores: Mapping[str, float], p: RegisterParams) -> Chance:
    """Whether ``value`` of ``p.metric`` clears its chance level by ``p.chance_margin``."""
    level = chance_level(str(p.metric), scores)
    if level is None or p.chance_margin is None:
        return Chance(level, None)
    greater = bool(p.greater_is_better)
    bar = chance_bar(level, greater, p.chance_margin)
    if (value >= bar) if greater else (value <= bar):
        return Chance(level, bar)
    return Chance(level, bar, (
        f"{p.metric} {value:.4f} does not clear chance {level:.4f} by the margin "
        f"(needs {'at least' if greater else 'at most'} {bar:.4f}: {p.chance_margin:.0%} of the "
        f"way from chance to a perfect score, register.chance_margin)"
    ))  # fmt: skip


def register_and_maybe_promote(
    run: Run,
    model_uri: str,
    metrics: Mapping[str, Any],
    p: RegisterParams,
    *,
    data_hash: str | None = None,
    rescore: Rescore | None = None,
) -> dict[str, Any]:
    """A new version of ``p.model_name``, tagged with metrics; the alias moves only on improvement.

    A version whose metric does not clear chance (``check_chance``) never gets the alias. Else
    the first version becomes champion; a tie (at the tags' 4 significant digits) does not move
    the alias. The comparison runs under ``promotion_lock`` and re-reads the champion right
    before moving the alias (compare-and-set). ``rescore(checkpoint)`` scores another checkpoint
    on this run's test split (for a champion scored on other data).
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
    client, data_hash = run.client, data_hash or "unknown"
    # a few headline numbers, rounded as people read them (the run keeps every metric in full);
    # this run is compared at this precision too, so a tag never disagrees with a decision
    tags = rounded_tags(scores, [p.metric, *HEADLINE_METRICS])
    tags["data_hash"] = data_hash  # (the version records its run id itself)
    value = scores[p.metric]
    chance = check_chance(float(tags[p.metric]), scores, p)
    # the client has no one-call equivalent (create the model if new, resolve a logged model's
    # URI, wait until READY): the fluent function, pointed at the run's store. Registering only
    # appends a version: it needs no lock.
    point_fluent_api_at(run.store)
    version = mlflow.register_model(model_uri, p.model_name, tags=tags)
    fault_point("register:version-created")
    with promotion_lock(run.store, p.model_name) as guard:
        champion = _champion(client, p.model_name, p.alias)  # re-read under the lock
        if chance.reason:  # at chance: nothing to compare (a re-score would be wasted)
            c = Comparison(False, _tagged(champion, p.metric), "chance", chance.reason)
        else:
            c = compare(champion, float(tags[p.metric]), p, data_hash, rescore, run.store)
        if c.promoted:
            client.set_registered_model_alias(p.model_name, p.alias, version.version)
        fault_point("register:alias-decided")
    for key, tag_value in _comparison_tags(champion, c, p.metric).items():
        client.set_model_version_tag(p.model_name, version.version, key, tag_value)
    if c.reason:
        log.warning("%s v%s not promoted: %s", p.model_name, version.version, c.reason)
    log.info(
        "registered %s v%s (%s=%.4f, champion %s, %s, %s): %s",
        *(p.model_name, version.version, p.metric, value, c.old, c.basis, guard),
        "promoted" if c.promoted else "alias unchanged",
    )
    return {
        "model_name": p.model_name,
        "version": int(version.version),
        "model_uri": model_uri,
        "alias": p.alias,
        "promoted": c.promoted,
        "metric": p.metric,
        "value": value,
        "previous_champion_version": int(champion.version) if champion is not None else None,
        "previous_champion_value": c.old,
        "previous_champion_tagged_value": c.tagged if c.basis == "rescored" else c.old,
        "compared_on": c.basis,
        "reason": c.reason,
        "champion_version": int(version.version)
        if c.promoted
        else (int(champion.version) if champion is not None else None),
        "same_data": c.basis in ("first", "same_data"),
        "lock": guard,
        "chance": chance.level,
        "chance_bar": chance.bar,
        "chance_margin": p.chance_margin,
    }


def _tagged(champion: Any | None, metric: str) -> float | None:
    """The champion's score as tagged at its registration (None: no champion, or no such tag)."""
    tag = champion.tags.get(metric) if champion is not None else None
    return float(tag) if tag is not None else None


def _comparison_tags(champion: Any | None, c: Comparison, metric: str) -> dict[str, str]:
    """What the new version was compared with when it was not the plain case (first version, or
    the champion's own tag on the same data): the champion, its score here, on which basis; and
    why a version at chance was not promoted."""
    if c.basis == "chance":
        return {"compared_on": "chance", "not_promoted_because": c.reason[:500]}
    if champion is None or c.basis == "same_data":
        return {}
    tags = {"compared_on": c.basis, "compared_with_version": str(champion.version)}
    if c.old is not None:
        tags[f"compared_with_{metric}"] = repr(c.old)
    if c.reason:
        tags["not_promoted_because"] = c.reason[:500]
    return tags
