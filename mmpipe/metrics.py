"""Evaluation metrics as pure numpy functions: retrieval recall@K, classification, regression.

Inputs may be numpy arrays, torch tensors or lists; everything is converted with ``np.asarray``
(tensors are moved to CPU first). Conventions:

* Similarity matrices are ``(n_images, n_texts)``; ``text_to_image[j]`` is the row of caption
  ``j``'s image. One image may own many captions.
* Ranking ties are broken by index (stable sort), so results are deterministic; an all-equal
  similarity matrix therefore ranks items in index order rather than at chance.
* Classification metrics take integer class indices; callers drop unlabelled samples (-1) first.
* Precision/recall/F1 with a zero denominator are 0 (sklearn's ``zero_division=0``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor: no hard torch import for a numpy module
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _ranks(sim: np.ndarray) -> np.ndarray:
    """rank[i, j] = 0-based position of column j in row i's descending order (stable)."""
    order = np.argsort(-sim, axis=1, kind="stable")  # (R, C)
    ranks = np.empty_like(order)
    rows = np.arange(sim.shape[0])[:, None]
    ranks[rows, order] = np.arange(sim.shape[1])[None, :]
    return ranks


def _check_sim(sim: np.ndarray, text_to_image: np.ndarray) -> None:
    if sim.ndim != 2:
        raise ValueError(f"similarity must be 2-D (n_images, n_texts), got shape {sim.shape}")
    if text_to_image.shape != (sim.shape[1],):
        raise ValueError(
            f"text_to_image has shape {text_to_image.shape}, expected ({sim.shape[1]},)"
        )
    if sim.shape[1] and (text_to_image.min() < 0 or text_to_image.max() >= sim.shape[0]):
        raise ValueError("text_to_image holds an image index outside the similarity rows")


def recall_at_k_i2t(sim: Any, text_to_image: Any, ks: Iterable[int]) -> dict[int, float]:
    """Image→text recall@K: an image hits if ANY of its captions ranks in its top K.

    Images without a caption are left out of the mean.
    """
    s, t2i = _np(sim).astype(np.float64), _np(text_to_image).astype(np.int64)
    _check_sim(s, t2i)
    ranks = _ranks(s)  # (I, T)
    own = t2i[None, :] == np.arange(s.shape[0])[:, None]  # (I, T) caption j belongs to image i
    has_caption = own.any(axis=1)
    best = np.where(own, ranks, np.iinfo(np.int64).max).min(axis=1)[has_caption]  # (I',)
    if best.size == 0:
        return {k: float("nan") for k in ks}
    return {k: float(np.mean(best < k)) for k in ks}


def recall_at_k_t2i(sim: Any, text_to_image: Any, ks: Iterable[int]) -> dict[int, float]:
    """Text→image recall@K: a caption hits if its own image ranks in its top K."""
    s, t2i = _np(sim).astype(np.float64), _np(text_to_image).astype(np.int64)
    _check_sim(s, t2i)
    if s.shape[1] == 0:
        return {k: float("nan") for k in ks}
    ranks = _ranks(s.T)  # (T, I)
    best = ranks[np.arange(s.shape[1]), t2i]  # (T,)
    return {k: float(np.mean(best < k)) for k in ks}


def retrieval_chance(
    text_to_image: Any, n_images: int, ks: Iterable[int]
) -> dict[str, dict[int, float]]:
    """Expected recall@K of a random ranking, for both directions (the floor to compare with).

    i2t: an image with c of the n captions misses only if all K draws avoid them:
    1 - C(n-c, K) / C(n, K), averaged over images. t2i: min(K, n_images) / n_images.
    """
    t2i = _np(text_to_image).astype(np.int64)
    n_texts = len(t2i)
    counts = np.bincount(t2i, minlength=n_images)[:n_images]
    counts = counts[counts > 0]
    i2t: dict[int, float] = {}
    t2i_chance: dict[int, float] = {}
    for k in ks:
        kk = min(k, n_texts)
        miss = [math.comb(n_texts - c, kk) / math.comb(n_texts, kk) for c in counts]
        i2t[k] = float(1.0 - np.mean(miss)) if miss else float("nan")
        t2i_chance[k] = min(k, n_images) / n_images if n_images else float("nan")
    return {"i2t": i2t, "t2i": t2i_chance}


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of exact matches (nan for no samples)."""
    t, p = _np(y_true), _np(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    return float(np.mean(t == p)) if t.size else float("nan")


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int | None = None) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class."""
    t, p = _np(y_true).astype(np.int64), _np(y_pred).astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if num_classes is None:
        num_classes = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes})")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, ...]:
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        denom = precision + recall
        f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return precision, recall, f1


def per_class_report(
    y_true: Any, y_pred: Any, num_classes: int | None = None, names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """A row per class: {"class", "index", "precision", "recall", "f1", "support", "predicted"}."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    precision, recall, f1 = _prf(tp, fp, fn)
    rows = []
    for i in range(cm.shape[0]):
        rows.append(
            {
                "class": names[i] if names is not None and i < len(names) else str(i),
                "index": i,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(cm[i].sum()),
                "predicted": int(cm[:, i].sum()),
            }
        )
    return rows


def macro_f1(y_true: Any, y_pred: Any, num_classes: int | None = None) -> float:
    """Unweighted mean F1 over the classes present in y_true OR y_pred.

    Classes absent from both are excluded: they have no true or predicted sample, so their F1 is
    undefined, and counting them as 0 would punish a model for a class the test split lacks.
    A class that is predicted but never true (or the reverse) counts, with F1 = 0.
    """
    rows = per_class_report(y_true, y_pred, num_classes)
    present = [r["f1"] for r in rows if r["support"] > 0 or r["predicted"] > 0]
    return float(np.mean(present)) if present else float("nan")


def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error."""
    t, p = _np(y_true).astype(np.float64), _np(y_pred).astype(np.float64)
    return float(np.mean(np.abs(t - p))) if t.size else float("nan")


def rmse(y_true: Any, y_pred: Any) -> float:
    """Root mean squared error."""
    t, p = _np(y_true).astype(np.float64), _np(y_pred).astype(np.float64)
    return float(np.sqrt(np.mean((t - p) ** 2))) if t.size else float("nan")


def r2(y_true: Any, y_pred: Any) -> float:
    """Coefficient of determination (1 - SS_res / SS_tot); nan for fewer than 2 samples."""
    from sklearn.metrics import r2_score

    t, p = _np(y_true).astype(np.float64), _np(y_pred).astype(np.float64)
    return float(r2_score(t, p)) if t.size >= 2 else float("nan")


def median_rank(sim: Any, text_to_image: Any) -> dict[str, float]:
    """1-based median rank of the first correct item, both ways: {"i2t": ..., "t2i": ...}.

    i2t: for each image, the best rank among its captions; t2i: the rank of each caption's image.
    """
    s, t2i = _np(sim).astype(np.float64), _np(text_to_image).astype(np.int64)
    _check_sim(s, t2i)
    if s.shape[1] == 0:
        return {"i2t": float("nan"), "t2i": float("nan")}
    ranks = _ranks(s)  # (I, T)
    own = t2i[None, :] == np.arange(s.shape[0])[:, None]
    has = own.any(axis=1)
    best_i2t = np.where(own, ranks, np.iinfo(np.int64).max).min(axis=1)[has] + 1
    best_t2i = _ranks(s.T)[np.arange(s.shape[1]), t2i] + 1
    return {"i2t": float(np.median(best_i2t)), "t2i": float(np.median(best_t2i))}


def multilabel_f1(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Micro and macro F1 of multi-hot (N, C) 0/1 arrays; macro over classes seen in either."""
    from sklearn.metrics import f1_score

    t, p = _np(y_true).astype(np.int64), _np(y_pred).astype(np.int64)
    if t.shape != p.shape or t.ndim != 2:
        raise ValueError(f"multi-hot arrays must be (N, C) and equal, got {t.shape} and {p.shape}")
    present = (t.sum(axis=0) + p.sum(axis=0)) > 0
    if not t.size or not present.any():
        return {"micro_f1": float("nan"), "macro_f1": float("nan")}
    micro = f1_score(t, p, average="micro", zero_division=0)
    macro = f1_score(t[:, present], p[:, present], average="macro", zero_division=0)
    return {"micro_f1": float(micro), "macro_f1": float(macro)}


def mean_average_precision(y_true: Any, scores: Any) -> float:
    """Mean over classes (with at least one positive) of the average precision of (N, C) scores."""
    from sklearn.metrics import average_precision_score

    t, s = _np(y_true).astype(np.int64), _np(scores).astype(np.float64)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"y_true and scores must be (N, C) and equal, got {t.shape} and {s.shape}")
    keep = t.sum(axis=0) > 0
    if not keep.any():
        return float("nan")
    return float(average_precision_score(t[:, keep], s[:, keep], average="macro"))


def auroc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve of binary labels vs scores; nan when only one class is present."""
    from sklearn.metrics import roc_auc_score

    t, s = _np(y_true).astype(np.int64), _np(scores).astype(np.float64)
    if len(np.unique(t)) < 2:
        return float("nan")
    return float(roc_auc_score(t, s))


def roc_points(y_true: Any, scores: Any) -> list[dict[str, float]]:
    """ROC curve as rows {"fpr", "tpr", "threshold"} (for plots); [] with a single class."""
    from sklearn.metrics import roc_curve

    t, s = _np(y_true).astype(np.int64), _np(scores).astype(np.float64)
    if len(np.unique(t)) < 2:
        return []
    fpr, tpr, thr = roc_curve(t, s)
    thr = np.where(np.isfinite(thr), thr, s.max() + 1.0)  # sklearn's first threshold is +inf
    return [
        {"fpr": float(f), "tpr": float(r), "threshold": float(h)}
        for f, r, h in zip(fpr, tpr, thr, strict=True)
    ]


# VQA answer normalisation, after the official evaluation script (Antol et al. 2015,
# VQA/PythonEvaluationTools/vqaEval.py): lower case, punctuation to spaces (a period only when not
# inside a number), apostrophes dropped, number words to digits, articles dropped, contractions
# spelled one way. Applied to predictions and references alike.
_VQA_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$~|:'")
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hasnt": "hasn't", "havent": "haven't",
    "isnt": "isn't", "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't",
    "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "whats": "what's",
}  # fmt: skip


def vqa_normalize(answer: str) -> str:
    """The VQA evaluation's answer normalisation (see the comment above)."""
    import re

    text = " ".join(str(answer).lower().replace("\n", " ").replace("\t", " ").split())
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)
    text = "".join(" " if ch in _VQA_PUNCT and ch != "'" else ch for ch in text)
    words = []
    for word in text.replace("'", "").split():
        word = _VQA_NUMBERS.get(word, word)
        if word in _VQA_ARTICLES:
            continue
        words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predicted: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Exact-match accuracy after :func:`vqa_normalize`.

    ``answers[i]`` is one reference answer, or the list of human answers of question i; with a
    list, the official min(#humans that said it / 3, 1) credit is used.
    """
    if len(predicted) != len(answers):
        raise ValueError(f"{len(predicted)} predictions but {len(answers)} answer sets")
    if not predicted:
        return float("nan")
    scores = []
    for pred, refs in zip(predicted, answers, strict=True):
        p = vqa_normalize(pred)
        if isinstance(refs, str):
            scores.append(float(p == vqa_normalize(refs)))
        else:
            hits = sum(p == vqa_normalize(r) for r in refs)
            scores.append(min(hits / 3.0, 1.0))
    return float(np.mean(scores))
