"""The task registry: every task the params allow has one spec, and every name a spec gives
(loss, decoding, metrics) is one the code that reads it knows."""

from __future__ import annotations

import typing

import pytest
import torch

from mmpipe import scoring
from mmpipe.config import ModelConfig
from mmpipe.model.multimodal import DECODERS, LOSSES, num_outputs, predict_labels
from mmpipe.taskspec import TASKS, task_spec
from mmpipe.train import VAL_METRICS, selection_metric


def test_every_task_of_the_params_has_exactly_one_spec():
    allowed = typing.get_args(ModelConfig.model_fields["task"].annotation)
    assert set(allowed) == set(TASKS)
    with pytest.raises(KeyError, match="unknown task 'nope'; known: multiclass"):
        task_spec("nope")


@pytest.mark.parametrize("task", list(TASKS))
def test_every_name_a_spec_gives_is_implemented(task):
    spec = TASKS[task]
    assert spec.captions or spec.loss in LOSSES
    assert spec.decode in DECODERS
    assert set(spec.val_metrics) <= set(VAL_METRICS)
    assert spec.register_metric in spec.test_metrics
    if not spec.captions:  # captioning's metrics come from generated text
        assert set(spec.test_metrics) <= set(scoring.TEST_METRICS)
        assert spec.selection in spec.val_metrics
        assert spec.prior is not None


@pytest.mark.parametrize("task", [t for t, s in TASKS.items() if s.selection])
def test_best_pt_is_picked_on_the_validation_twin_of_the_register_metric(task):
    """What picks best.pt agrees with what register compares (vqa: exact-match accuracy on
    the answered val questions; captioning: the token loss, CIDEr needs beam search)."""
    spec = TASKS[task]
    twins = {"vqa_accuracy": "val_accuracy"}
    assert spec.selection == twins.get(spec.register_metric, f"val_{spec.register_metric}")
    name, value = selection_metric({spec.selection: 0.25, "val_mean_r1": 0.9}, task)
    assert value == (0.25 if spec.selection_greater else -0.25)
    assert name == (spec.selection if spec.selection_greater else f"-{spec.selection}")


def test_outputs_and_decoding_follow_the_spec():
    assert [num_outputs(t, 3) for t in TASKS] == [3, 1, 3, 1, 3, 3]
    z = torch.tensor([[0.5, -1.0, 2.0], [-0.5, 3.0, -2.0]])
    assert predict_labels(z, "multiclass").tolist() == [2, 1]
    assert predict_labels(z, "binary").tolist() == [1, 0]
    assert predict_labels(z, "multilabel").tolist() == [[1, 0, 1], [0, 1, 0]]
    assert predict_labels(z, "regression").tolist() == [0.5, -0.5]
