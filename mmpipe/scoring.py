"""Task metrics from a split's head outputs: what evaluate writes and the ablation compares.

    score_outputs(task, logits, target)   the task's metrics (mmpipe/objectives.py's table)
    chance_scores(task, logits, target)   the same metrics of a predictor that ignores its input
    details(task, ...)                     per class, ROC points, predicted vs true, per question type

``target`` is what ``model.batch_targets`` gives per pair, with two evaluation-only forms: a
multilabel target is multi-hot (N, K), and a VQA question whose answer is outside the answer
vocabulary is -2 (answered, so it counts as wrong) where an unanswered one is -1 (left out).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from mmpipe import metrics as M
from mmpipe.model import labelled_rows, predict_labels
from mmpipe.taskspec import task_spec

UNKNOWN_ANSWER = -2  # a VQA target: answered, but not in the vocabulary (never predicted)


def scored_rows(task: str, target: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the pairs a task is scored on (VQA: every answered question)."""
    if task == "vqa":
        return target != -1
    if task_spec(task).target == "labels":
        return target.sum(dim=1) > 0 if target.dtype.is_floating_point else (target >= 0).any(1)
    return labelled_rows(target, task)


def score_outputs(task: str, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """The task's test metrics (+ n_labelled) of logits (N, K) against targets; {} if none."""
    rows = scored_rows(task, target)
    if not rows.any():
        return {}
    z, y = logits[rows].float(), target[rows]
    pred = predict_labels(z, task)
    out: dict[str, float] = {"n_labelled": float(rows.sum())}
    return out | {name: TEST_METRICS[name](y, pred, z) for name in task_spec(task).test_metrics}


def _macro_f1(y: torch.Tensor, pred: torch.Tensor, z: torch.Tensor) -> float:
    """Macro-F1 of multi-hot rows (multilabel: over the classes seen), or of class indices over
    the head's classes (at least 2) and every label seen."""
    if y.ndim == 2:
        return M.multilabel_f1(y, pred)["macro_f1"]
    return M.macro_f1(y, pred, max(z.shape[1], 2, int(max(y.max(), pred.max())) + 1))


# a test metric's name -> its value from the scored rows' targets, labels and float logits;
# multilabel's targets are multi-hot; vqa is exact match (answers normalised at ingest, <unk>
# never matches). Captioning's metrics come from generated text (mmpipe.captioning).
TEST_METRICS = {
    "accuracy": lambda y, pred, z: M.accuracy(y, pred),
    "macro_f1": lambda y, pred, z: _macro_f1(y, pred, z),
    "auroc": lambda y, pred, z: M.auroc(y, z[:, 0]),
    "micro_f1": lambda y, pred, z: M.multilabel_f1(y, pred)["micro_f1"],
    "map": lambda y, pred, z: M.mean_average_precision(y, torch.sigmoid(z)),
    "mae": lambda y, pred, z: M.mae(y, pred),
    "rmse": lambda y, pred, z: M.rmse(y, pred),
    "r2": lambda y, pred, z: M.r2(y, pred),
    "vqa_accuracy": lambda y, pred, z: M.accuracy(y, pred),
}


def prior_logits(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Constant outputs of the best input-blind guess on these targets: the majority class
    (answer), the mean value, or each class's prevalence (multilabel)."""
    rows = scored_rows(task, target)
    y, n, spec = target[rows], len(target), task_spec(task)
    if spec.prior == "mean":
        return torch.full((n, 1), float(y.float().mean()))
    if spec.prior == "prevalence":
        prevalence = y.float().mean(dim=0).clamp(1e-4, 1 - 1e-4)
        return torch.logit(prevalence).expand(n, -1)
    known = y[y >= 0]
    majority = int(torch.mode(known).values) if len(known) else 0
    if spec.single_output:
        return torch.full((n, 1), 1.0 if majority == 1 else -1.0)
    out = torch.zeros(n, logits.shape[1])
    out[:, majority] = 1.0
    return out


def chance_scores(task: str, logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``<primary metric>_chance``: the prior guess's score (it ignores image and text)."""
    primary = task_spec(task).register_metric
    scores = score_outputs(task, prior_logits(task, logits, target), target)
    return {f"{primary}_chance": scores[primary]} if primary in scores else {}


# ----------------------------------------------------------------------------- details


def per_class(
    task: str, logits: torch.Tensor, target: torch.Tensor, names: Sequence[str]
) -> list[dict[str, Any]]:
    """Precision / recall / F1 / support per class (multilabel: + average precision)."""
    rows = scored_rows(task, target)
    z, y = logits[rows].float(), target[rows]
    pred = predict_labels(z, task)
    if task_spec(task).target != "labels":
        k = max(len(names), z.shape[1], int(max(y.max(), pred.max())) + 1)
        return M.per_class_report(y, pred, k, _names(names, k))
    out = []
    for i, name in enumerate(_names(names, z.shape[1])):
        report = M.per_class_report(y[:, i], pred[:, i], 2)[1]  # class i present vs absent
        ap = M.mean_average_precision(y[:, i : i + 1], torch.sigmoid(z[:, i : i + 1]))
        out.append({**report, "class": name, "index": i, "ap": ap})
    return out


def _names(names: Sequence[str], k: int) -> list[str]:
    return [names[i] if i < len(names) else str(i) for i in range(k)]


def roc_rows(logits: torch.Tensor, target: torch.Tensor) -> list[dict[str, float]]:
    """The ROC curve of a binary head (plots/roc.json)."""
    rows = target >= 0
    return M.roc_points(target[rows], logits[rows, 0].float())


def regression_rows(logits: torch.Tensor, target: torch.Tensor) -> list[dict[str, float]]:
    """(true, predicted) per labelled pair (plots/predicted_vs_true.json)."""
    rows = ~torch.isnan(target)
    pairs = zip(target[rows].tolist(), logits[rows, 0].float().tolist(), strict=True)
    return [{"true": t, "predicted": p} for t, p in pairs]


def vqa_by_type(
    logits: torch.Tensor,
    answers: Sequence[str | None],
    qtypes: Sequence[str],
    names: Sequence[str],
) -> tuple[float, list[dict[str, Any]]]:
    """VQA accuracy (the standard normalisation, exact match) overall and per question type."""
    pred = predict_labels(logits.float(), "vqa").tolist()
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (answer, qtype) in enumerate(zip(answers, qtypes, strict=True)):
        if answer is not None:
            groups[qtype].append(i)
    guesses = [names[p] if p < len(names) else "" for p in pred]

    def accuracy(index: list[int]) -> float:
        return M.vqa_accuracy([guesses[i] for i in index], [str(answers[i]) for i in index])

    rows = [{"question_type": q, "n": len(ix), "vqa_accuracy": accuracy(ix)}
            for q, ix in sorted(groups.items())]  # fmt: skip
    every = [i for ix in groups.values() for i in ix]
    return (accuracy(every) if every else float("nan")), rows


def question_type(question: str, meta: dict[str, Any]) -> str:
    """A question's type: the record's ``question_type`` field, else its first two words (how
    the VQA dataset groups questions, e.g. "how many", "what colour")."""
    given = meta.get("question_type")
    if isinstance(given, str) and given:
        return given
    return " ".join(M.vqa_normalize(question).split()[:2]) or "(empty)"


def task_target(batch: dict[str, Any], task: str, num_outputs: int) -> torch.Tensor:
    """The evaluation form of a batch's targets (see the module docstring)."""
    from mmpipe.model import batch_targets, multi_hot

    target = batch_targets(batch, task)
    if task_spec(task).target == "labels":
        return multi_hot(target, num_outputs)
    if task == "vqa":
        answered = torch.tensor([a is not None for a in batch["label_text"]])
        return torch.where((target < 0) & answered, UNKNOWN_ANSWER, target)
    return target


def primary_score(task: str, scores: dict[str, float]) -> float | None:
    """The task's primary metric in ``scores`` (what the ablation compares), None if absent."""
    return scores.get(task_spec(task).register_metric)
