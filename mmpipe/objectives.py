"""What each task is scored on, and which metric decides the champion (the tasks themselves:
mmpipe/taskspec.py).

    task        head        target of a pair                test metrics (metrics.json)
    multiclass  K logits    class index                     accuracy, macro_f1 (+ per class)
    binary      1 logit     class index 0/1                 accuracy, macro_f1, auroc (+ ROC)
    multilabel  K logits    a set of class indices          micro_f1, macro_f1, map
    regression  1 output    float(label)                    mae, rmse, r2 (+ predicted vs true)
    vqa         K logits    answer index (<unk>: none)      vqa_accuracy (+ per question type)
    captioning  a decoder   the caption's words             bleu4, cider, and the nearest-
                                                            neighbour baseline's nn_bleu4, nn_cider

Every run, labelled or not, is also scored on retrieval: ``i2t_rK``, ``t2i_rK``, ``mean_r1``
(the mean of i2t_r1 and t2i_r1) and the median ranks. A run whose train or test split has no
labelled pair has retrieval only, so its register metric defaults to ``mean_r1``; captioning
needs no labels (its captions are its targets), so it is always scored and registered on cider.

A model is promoted only when its register metric clears the metric's chance level (what
evaluate writes as the input-blind guess: ``<metric>_chance``, ``i2t_chance_rK``, ...) by
``register.chance_margin`` of the way from chance to a perfect score (``chance_bar``).

Pure Python: the params validation (config), the pipeline's pre-flight check and evaluate use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from mmpipe.errors import InputError
from mmpipe.manifest import Manifest
from mmpipe.taskspec import TASKS, task_spec

RETRIEVAL_METRIC = "mean_r1"
LOWER_IS_BETTER = frozenset({"mae", "rmse", "median_rank_i2t", "median_rank_t2i"})
COUNTS = ("n_test_pairs", "n_test_images")


def retrieval_metric_names(ks: Iterable[int]) -> list[str]:
    """What evaluate writes for every run: R@K both ways, their chance levels, mean R@1, ranks."""
    names = [f"{d}_{kind}{k}" for k in ks for d in ("i2t", "t2i") for kind in ("r", "chance_r")]
    return names + [RETRIEVAL_METRIC, "median_rank_i2t", "median_rank_t2i", *COUNTS]


def labelled_metric_names(task: str) -> list[str]:
    """What evaluate adds when the test split has labelled pairs (ablation summaries included)."""
    spec = task_spec(task)
    primary = spec.register_metric
    return [
        *spec.test_metrics, "n_labelled", f"{primary}_chance",
        f"best_unimodal_{primary}", f"ablation_best_{primary}", "fusion_gain",
    ]  # fmt: skip


ZERO_SHOT = ("zero_shot_accuracy", "zero_shot_macro_f1", "zero_shot_chance", "zero_shot_n")


def possible_metrics(task: str, ks: Iterable[int], labelled: bool = True) -> list[str]:
    """Every metrics.json key a run of ``task`` can have (zero-shot depends on the test data)."""
    names = retrieval_metric_names(ks) + list(ZERO_SHOT)
    if not task_spec(task).needs_labels:
        return [*names, *task_spec(task).test_metrics, "n_caption_images"]
    return names + (labelled_metric_names(task) if labelled else [])


def greater_is_better(metric: str) -> bool:
    """The natural direction of a metric: errors and ranks are better lower."""
    return metric not in LOWER_IS_BETTER


def check_metric_for_task(metric: str | None, task: str, ks: Iterable[int]) -> None:
    """ValueError when ``metric`` (register.metric) is never produced by a run of ``task``."""
    names = possible_metrics(task, ks)
    if metric is not None and metric not in names:
        raise ValueError(
            f"register.metric={metric!r} is not a metric of train.task={task!r}; it has "
            f"{', '.join(task_spec(task).test_metrics)}, retrieval ({RETRIEVAL_METRIC}, i2t_r1, ...) and "
            "the rest of metrics.json; null picks the task's default"
        )


def has_task_labels(manifest: Manifest) -> bool:
    """True when the shards let a task head be trained AND scored: labelled train and test pairs."""
    return manifest.labelled("train") and manifest.labelled("test")


def resolve_metric(
    metric: str | None, greater: bool | None, task: str, labelled: bool
) -> tuple[str, bool]:
    """(register metric, greater_is_better) of a run: the params' or the task's default."""
    spec = task_spec(task)
    scored = labelled or not spec.needs_labels
    name = metric or (spec.register_metric if scored else RETRIEVAL_METRIC)
    return name, greater_is_better(name) if greater is None else greater


def check_metric_for_data(
    metric: str | None, task: str, manifest: Manifest, ks: Iterable[int]
) -> tuple[str, bool]:
    """The register metric of a run on these shards; InputError if it cannot be produced.

    Called before training, so a run that could never be registered fails in seconds.
    """
    labelled = has_task_labels(manifest)
    name, _ = resolve_metric(metric, None, task, labelled)
    if name in possible_metrics(task, ks, labelled):
        return name, greater_is_better(name)
    raise InputError(
        f"register.metric={name!r} needs labelled train and test pairs, but the shards have "
        f"labels: {manifest.labels} (labelled pairs per split: "
        f"{manifest.labelled_pairs_per_split}); "
        f"use register.metric={RETRIEVAL_METRIC} (or null) for a retrieval-only run"
    )


def metric_of(
    metric: str | None, greater: bool | None, scores: Mapping[str, Any]
) -> tuple[str, bool]:
    """(metric, greater_is_better) for scores of an unknown task: the register metric of the task
    they look like (``scores_task``), else mean_r1."""
    if metric is None:
        task = scores_task(scores)
        metric = task_spec(task).register_metric if task else RETRIEVAL_METRIC
    return metric, greater_is_better(metric) if greater is None else greater


def scores_task(scores: Mapping[str, Any]) -> str | None:
    """The task whose register metric ``scores`` hold and the most of whose test metrics they
    hold (binary's accuracy, macro_f1, auroc over multiclass's accuracy, macro_f1); None when
    they hold no task's register metric (a retrieval-only run)."""

    def held(task: str) -> tuple[float, int]:
        n = sum(m in scores for m in TASKS[task].test_metrics)
        return n / len(TASKS[task].test_metrics), n

    tasks = [t for t, spec in TASKS.items() if spec.register_metric in scores]
    return max(tasks, key=held) if tasks else None


# metrics.json keys of a register metric's chance level, where it is not `<metric>_chance`
_CHANCE_KEYS = {
    RETRIEVAL_METRIC: ("i2t_chance_r1", "t2i_chance_r1"),  # mean_r1 is their mean's counterpart
    "zero_shot_accuracy": ("zero_shot_chance",),
}
_RECALL = re.compile(r"(i2t|t2i)_r(\d+)")


def chance_level(metric: str, scores: Mapping[str, Any]) -> float | None:
    """The chance level of ``metric`` in metrics.json ``scores`` (what an input-blind guess or a
    random ranking scores on this test split); None when evaluate wrote none for it."""
    recall = _RECALL.fullmatch(metric)
    if recall:
        keys: tuple[str, ...] = (f"{recall[1]}_chance_r{recall[2]}",)
    else:
        keys = _CHANCE_KEYS.get(metric, (f"{metric}_chance",))
    values = [scores.get(k) for k in keys]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def chance_bar(chance: float, greater: bool, margin: float) -> float:
    """The score a model must reach to count as better than chance: ``margin`` of the way from
    the chance level to a perfect score (1 for the rates, 0 for the errors rmse and mae)."""
    perfect = 1.0 if greater else 0.0
    return chance + margin * (perfect - chance)


def task_label(task: str, metrics: Mapping[str, Any]) -> str:
    """What a run was scored on, as reports and model cards name it: the task, or ``retrieval``
    when the run had no task labels (its head was never trained nor scored)."""
    spec = TASKS.get(task)
    if spec is not None and (not spec.needs_labels or spec.register_metric in metrics):
        return task
    return "retrieval"
