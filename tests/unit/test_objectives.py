"""Which metric each task is scored and registered on, and the task metrics themselves."""

from __future__ import annotations

import math

import pytest
import torch

from mmpipe import scoring
from mmpipe.config import ParamsError, load_params
from mmpipe.errors import InputError
from mmpipe.manifest import Manifest
from mmpipe.objectives import (
    chance_bar,
    chance_level,
    check_metric_for_data,
    has_task_labels,
    metric_of,
    resolve_metric,
    task_label,
)
from mmpipe.taskspec import TASKS

LABELLED = Manifest(
    splits={}, labels="all", labelled_pairs_per_split={"train": 10, "val": 2, "test": 3}
)
UNLABELLED = Manifest(
    splits={}, labels="none", labelled_pairs_per_split={"train": 0, "val": 0, "test": 0}
)


@pytest.mark.parametrize(
    ("task", "metric", "greater"),
    [("multiclass", "accuracy", True), ("binary", "macro_f1", True), ("multilabel", "map", True),
     ("regression", "rmse", False), ("vqa", "vqa_accuracy", True)],
)  # fmt: skip
def test_register_metric_defaults_per_task(task, metric, greater):
    assert resolve_metric(None, None, task, labelled=True) == (metric, greater)
    assert resolve_metric(None, None, task, labelled=False) == ("mean_r1", True)
    assert check_metric_for_data(None, task, LABELLED, [1, 5]) == (metric, greater)
    assert check_metric_for_data(None, task, UNLABELLED, [1, 5]) == ("mean_r1", True)


def test_an_explicit_metric_the_run_cannot_have_is_an_error_before_training():
    with pytest.raises(InputError, match="accuracy.*labels: none.*mean_r1"):
        check_metric_for_data("accuracy", "multiclass", UNLABELLED, [1, 5])
    # a partly labelled collection whose test split has no labels is scored on retrieval only
    partial = Manifest(
        splits={}, labels="partial", labelled_pairs_per_split={"train": 5, "test": 0}
    )
    assert not has_task_labels(partial)
    with pytest.raises(InputError, match="partial"):
        check_metric_for_data("accuracy", "multiclass", partial, [1])
    assert check_metric_for_data("i2t_r5", "multiclass", UNLABELLED, [1, 5]) == ("i2t_r5", True)


def test_params_reject_a_metric_the_task_never_produces():
    with pytest.raises(ParamsError, match="register.metric='rmse' is not a metric of"):
        load_params(None, ["register.metric=rmse"])
    p = load_params(None, ["train.task=regression", "register.metric=mae"])
    assert p.register.metric == "mae"


def test_registry_fallback_for_scores_of_an_unknown_task():
    assert metric_of(None, None, {"rmse": 1.0, "mean_r1": 0.5}) == ("rmse", False)
    assert metric_of(None, None, {"mean_r1": 0.5}) == ("mean_r1", True)
    assert metric_of("mae", True, {}) == ("mae", True)  # an explicit direction wins
    # binary's scores hold multiclass's too: the task holding the most of its metrics wins
    binary = {"accuracy": 0.9, "macro_f1": 0.8, "auroc": 0.7, "mean_r1": 0.1}
    assert metric_of(None, None, binary) == ("macro_f1", True)
    assert metric_of(None, None, {"accuracy": 0.9, "macro_f1": 0.8}) == ("accuracy", True)
    multilabel = {"micro_f1": 0.5, "macro_f1": 0.4, "map": 0.6}
    assert metric_of(None, None, multilabel) == ("map", True)
    assert metric_of(None, None, {"bleu4": 0.1, "cider": 0.2}) == ("cider", True)


# ----------------------------------------------------------------------------- scoring


def test_multiclass_scores_and_chance():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1, 1, 0, -1])  # the last pair is unlabelled
    s = scoring.score_outputs("multiclass", logits, target)
    assert s == {"n_labelled": 4.0, "accuracy": 0.75, "macro_f1": pytest.approx(0.7333333)}
    # the prior guess: always class 0 (the first of the tied majority): half right
    assert scoring.chance_scores("multiclass", logits, target) == {"accuracy_chance": 0.5}


def test_binary_adds_auroc_and_roc_points():
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]])
    target = torch.tensor([1, 0, 0, 0])
    s = scoring.score_outputs("binary", logits, target)
    assert s["auroc"] == 1.0 and s["accuracy"] == 0.75
    rows = scoring.roc_rows(logits, target)
    assert rows[0]["fpr"] == 0.0 and rows[-1] == {**rows[-1], "fpr": 1.0, "tpr": 1.0}
    assert scoring.chance_scores("binary", logits, target)["macro_f1_chance"] == pytest.approx(
        3 / 7  # always "0": F1 6/7 for class 0, 0 for class 1
    )


def test_multilabel_scores_on_multi_hot_targets():
    logits = torch.tensor([[3.0, -3.0, 2.0], [-2.0, 1.0, -1.0], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # last: none
    s = scoring.score_outputs("multilabel", logits, target)
    assert s["n_labelled"] == 2.0
    # predictions [1,0,1], [0,1,0]: 3 of 4 true classes found, no false positive
    assert s["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    assert s["map"] == pytest.approx((1.0 + 1.0 + 1.0) / 3)  # every class ranked perfectly
    chance = scoring.chance_scores("multilabel", logits, target)["map_chance"]
    assert chance == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # constant scores: AP = prevalence
    rows = scoring.per_class("multilabel", logits, target, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"] and rows[2]["recall"] == 0.5


def test_regression_scores_and_mean_prediction_chance():
    out = torch.tensor([[1.0], [2.0], [4.0], [0.0]])
    target = torch.tensor([1.0, 3.0, 4.0, float("nan")])
    s = scoring.score_outputs("regression", out, target)
    assert s["mae"] == pytest.approx(1 / 3) and s["rmse"] == pytest.approx(math.sqrt(1 / 3))
    assert s["r2"] == pytest.approx(1 - 1 / (14 / 3))
    mean_rmse = math.sqrt(((1 - 8 / 3) ** 2 + (3 - 8 / 3) ** 2 + (4 - 8 / 3) ** 2) / 3)
    assert scoring.chance_scores("regression", out, target)["rmse_chance"] == pytest.approx(
        mean_rmse
    )
    assert len(scoring.regression_rows(out, target)) == 3


def test_vqa_accuracy_counts_unknown_answers_as_wrong_and_splits_by_question_type():
    names = ["2", "red", "yes"]
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0], [0, 5.0, 0]])
    # answered in-vocabulary x3, answered outside the vocabulary (<unk>), unanswered
    target = torch.tensor([0, 1, 0, scoring.UNKNOWN_ANSWER, -1])
    assert scoring.score_outputs("vqa", logits, target)["vqa_accuracy"] == 0.5
    answers = ["two", "Red", "yes ", "purple", None]  # raw: normalised before matching
    qtypes = ["how many", "what colour", "is left of", "what colour", "how many"]
    overall, rows = scoring.vqa_by_type(logits, answers, qtypes, names)
    assert overall == 0.75
    assert {r["question_type"]: r["vqa_accuracy"] for r in rows} == {
        "how many": 1.0, "is left of": 1.0, "what colour": 0.5,
    }  # fmt: skip
    assert scoring.question_type("How many cats are there?", {}) == "how many"
    assert scoring.question_type("x", {"question_type": "count"}) == "count"


def test_every_task_has_a_default_metric_its_scores_contain():
    for task, metric in ((t, s.register_metric) for t, s in TASKS.items()):
        if task == "captioning":  # scored on generated text: tests/unit/test_captioning.py
            continue
        k = 3 if task not in ("binary", "regression") else 1
        logits = torch.randn(6, k)
        if task == "multilabel":
            target = torch.tensor([[1.0, 0, 1], [0, 1, 0]] * 3)
        elif task == "regression":
            target = torch.randn(6)
        else:
            target = torch.tensor([0, 1, 0, 1, 0, 1])
        assert metric in scoring.score_outputs(task, logits, target), task


# ----------------------------------------------------------------------------- chance


def test_chance_level_of_each_register_metric():
    scores = {"i2t_chance_r1": 0.3, "t2i_chance_r1": 0.2, "i2t_chance_r5": 0.9,
              "accuracy_chance": 0.75, "rmse_chance": 2.0, "zero_shot_chance": 0.25}  # fmt: skip
    assert chance_level("mean_r1", scores) == pytest.approx(0.25)
    assert chance_level("i2t_r5", scores) == 0.9
    assert chance_level("accuracy", scores) == 0.75
    assert chance_level("zero_shot_accuracy", scores) == 0.25
    assert chance_level("macro_f1", scores) is None  # evaluate wrote none: nothing to compare
    assert chance_level("mean_r1", {"i2t_chance_r1": float("nan"), "t2i_chance_r1": 0.2}) is None
    # the bar: `margin` of the way from chance to a perfect score (1 for rates, 0 for errors)
    assert chance_bar(0.25, True, 0.1) == pytest.approx(0.325)
    assert chance_bar(2.0, False, 0.1) == pytest.approx(1.8)


def test_an_unlabelled_run_is_named_retrieval():
    assert task_label("multiclass", {"mean_r1": 0.3}) == "retrieval"
    assert task_label("multiclass", {"mean_r1": 0.3, "accuracy": 0.9}) == "multiclass"
    assert task_label("captioning", {"cider": 0.1}) == "captioning"
