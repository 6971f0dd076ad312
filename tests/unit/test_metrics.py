"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmpipe import metrics

# 3 images, 5 captions: image 0 owns captions 0,1; image 1 owns 2,3; image 2 owns 4.
T2I = [0, 0, 1, 1, 2]
SIM = np.array(
    [
        # c0   c1   c2   c3   c4
        [0.1, 0.9, 0.8, 0.0, 0.2],  # image 0: its caption c1 ranks first -> hit@1
        [0.9, 0.1, 0.2, 0.8, 0.0],  # image 1: c0 first, c3 second -> miss@1, hit@2
        [0.5, 0.4, 0.3, 0.2, 0.1],  # image 2: c4 ranks last (5th) -> hit only @5
    ]
)


def test_i2t_recall_any_caption_counts():
    r = metrics.recall_at_k_i2t(SIM, T2I, ks=[1, 2, 5])
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: pytest.approx(1.0)}


def test_t2i_recall_own_image():
    # column ranks: c0 -> [i1 .9, i2 .5, i0 .1] own i0 rank 2; c1 -> i0 first, rank 0;
    # c2 -> [i0 .8, i2 .3, i1 .2] own i1 rank 2; c3 -> i1 first, rank 0; c4 -> [i0 .2, i2 .1] rank 1
    r = metrics.recall_at_k_t2i(SIM, T2I, ks=[1, 2, 3])
    assert r == {1: pytest.approx(2 / 5), 2: pytest.approx(3 / 5), 3: pytest.approx(1.0)}


def test_recall_accepts_torch_and_rejects_bad_mapping():
    r = metrics.recall_at_k_t2i(torch.tensor(SIM), torch.tensor(T2I), ks=[1])
    assert r[1] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        metrics.recall_at_k_i2t(SIM, [0, 0, 1, 1, 3], ks=[1])
    with pytest.raises(ValueError):
        metrics.recall_at_k_i2t(SIM, [0, 0, 1], ks=[1])


def test_ties_break_by_index():
    sim = np.zeros((2, 2))
    assert metrics.recall_at_k_i2t(sim, [0, 1], ks=[1]) == {1: 0.5}  # image 0 hits, image 1 not


def test_retrieval_chance():
    ch = metrics.retrieval_chance(T2I, n_images=3, ks=[1, 2])
    # i2t k=1: images own 2/5, 2/5, 1/5 captions -> mean 1/3
    assert ch["i2t"][1] == pytest.approx((2 / 5 + 2 / 5 + 1 / 5) / 3)
    # k=2: 1 - C(3,2)/C(5,2) = 0.7 for 2 captions, 1 - C(4,2)/C(5,2) = 0.4 for 1
    assert ch["i2t"][2] == pytest.approx((0.7 + 0.7 + 0.4) / 3)
    assert ch["t2i"] == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3)}
    assert math.isclose(metrics.retrieval_chance([0], 1, [5])["i2t"][5], 1.0)


def test_accuracy_and_confusion_matrix():
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    cm = metrics.confusion_matrix(y_true, y_pred, num_classes=4)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0], expected[0, 1], expected[1, 1] = 1, 1, 1
    expected[2, 2], expected[2, 0] = 2, 1
    np.testing.assert_array_equal(cm, expected)
    with pytest.raises(ValueError):
        metrics.confusion_matrix([0, 5], [0, 1], num_classes=3)


def test_per_class_and_macro_f1_hand_computed():
    y_true = [0, 0, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 2, 0, 2]
    rows = metrics.per_class_report(y_true, y_pred, num_classes=4, names=["a", "b", "c", "d"])
    # class a: tp1 fp1 fn1 -> p .5 r .5 f1 .5; b: tp1 fp1 fn0 -> p .5 r 1 f1 2/3;
    # c: tp2 fp0 fn1 -> p 1 r 2/3 f1 .8; d: absent everywhere -> zeros, support 0
    assert [r["class"] for r in rows] == ["a", "b", "c", "d"]
    assert rows[0]["f1"] == pytest.approx(0.5)
    assert rows[1]["precision"] == pytest.approx(0.5) and rows[1]["recall"] == pytest.approx(1.0)
    assert rows[1]["f1"] == pytest.approx(2 / 3)
    assert rows[2]["f1"] == pytest.approx(0.8) and rows[2]["support"] == 3
    assert rows[3] == {
        "class": "d",
        "index": 3,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "predicted": 0,
    }
    # class d is excluded from the macro mean (absent from both y_true and y_pred)
    assert metrics.macro_f1(y_true, y_pred, num_classes=4) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)


def test_macro_f1_counts_predicted_only_class_as_zero():
    # class 1 is predicted but never true: F1 0 and included
    assert metrics.macro_f1([0, 0], [0, 1], num_classes=3) == pytest.approx((2 / 3 + 0.0) / 2)


def test_regression_errors():
    assert metrics.mae([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(4 / 3)
    assert metrics.rmse([1.0, 2.0, 4.0], [2.0, 2.0, 1.0]) == pytest.approx(math.sqrt(10 / 3))


def test_median_rank_both_ways():
    # i2t: image 0's best caption ranks 1st, image 1's 2nd, image 2's 5th -> median 2
    # t2i: each caption's own image ranks c0 3rd, c1 1st, c2 3rd, c3 1st, c4 2nd -> median 2
    med = metrics.median_rank(SIM, T2I)
    assert med == {"i2t": 2.0, "t2i": 2.0}
    assert metrics.median_rank(np.eye(3), [0, 1, 2]) == {"i2t": 1.0, "t2i": 1.0}


def test_r2_perfect_mean_and_worse():
    y = [1.0, 2.0, 3.0, 4.0]
    assert metrics.r2(y, y) == 1.0
    assert metrics.r2(y, [2.5] * 4) == pytest.approx(0.0)
    assert metrics.r2(y, [4.0, 3.0, 2.0, 1.0]) < 0
    assert math.isnan(metrics.r2([1.0], [1.0]))


def test_multilabel_f1_micro_and_macro_by_hand():
    t = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]])
    p = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 1]])
    # class 0: tp 2 -> f1 1; class 1: tp 1, fn 1 -> f1 2/3; class 2: fp 1 -> f1 0
    out = metrics.multilabel_f1(t, p)
    assert out["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    # micro: tp 3, fp 1, fn 1 -> 2*3 / (2*3 + 1 + 1)
    assert out["micro_f1"] == pytest.approx(6 / 8)


def test_map_and_auroc():
    t = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    perfect = np.array([[0.9, 0.1], [0.2, 0.8], [0.8, 0.3], [0.1, 0.2]])
    assert metrics.mean_average_precision(t, perfect) == pytest.approx(1.0)
    reversed_scores = -perfect
    assert metrics.mean_average_precision(t, reversed_scores) < 0.7
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert metrics.auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert math.isnan(metrics.auroc([1, 1], [0.2, 0.3]))
    pts = metrics.roc_points([0, 1, 1, 0], [0.1, 0.9, 0.6, 0.4])
    assert pts[0]["fpr"] == 0.0 and pts[-1]["tpr"] == 1.0


def test_vqa_normalisation_and_accuracy():
    assert metrics.vqa_normalize("Two.") == "2"
    assert metrics.vqa_normalize("The  Red ") == "red"
    assert metrics.vqa_normalize("don't") == metrics.vqa_normalize("dont") == "don't"
    assert metrics.vqa_normalize("3.5") == "3.5"
    assert metrics.vqa_normalize("left-side") == "left side"
    assert metrics.vqa_accuracy(["two", "blue"], ["2", "red"]) == 0.5
    # official credit with several human answers: min(matches / 3, 1)
    assert metrics.vqa_accuracy(["yes"], [["yes", "yes", "no"]]) == pytest.approx(2 / 3)
