"""What each task is: the one registry every stage reads (``TASKS``, ``task_spec``).

    task        head        target of a pair               loss            picks best.pt
    multiclass  K logits    class index                    cross-entropy   val_accuracy
    binary      1 logit     class index 0/1                BCE             val_macro_f1
    multilabel  K logits    a set of class indices         BCE per class   val_map
    regression  1 output    float(label)                   MSE             -val_rmse
    vqa         K logits    answer index (<unk>: none)     cross-entropy   val_accuracy
    captioning  a decoder   the caption's words            token CE        -val_loss

A ``TaskSpec`` names what the code branches on; the code that does it is keyed by those names:
the loss (``model.multimodal.LOSSES``), the decoding of logits into labels (``DECODERS``), the
test metrics (``scoring.TEST_METRICS``), the input-blind guess (``scoring.prior_logits``),
evaluate's per-task details and what predict returns. Adding a task that reuses them is one
entry here (and its name in ``ModelConfig.task``); a new loss or metric is one function more.

Pure Python: the params validation (config, through objectives) imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Target = Literal["label", "labels", "value"]  # the loader batch's key of a pair's target
Loss = Literal["cross_entropy", "binary_cross_entropy", "multilabel_bce", "mse", "caption"]
Decode = Literal["argmax", "positive", "multi_hot", "value"]  # logits -> labels
Prior = Literal["majority", "prevalence", "mean"]  # the best input-blind guess
Detail = Literal["per_class", "confusion", "roc", "predicted_vs_true", "per_question_type"]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its head, targets, loss, decoding, how best.pt is picked and what it is
    scored and registered on."""

    name: str
    single_output: bool  # one logit/value per pair; else one per class (answer)
    target: Target
    loss: Loss
    decode: Decode
    needs_labels: bool  # False: scored without labels (captioning: its captions are targets)
    val_metrics: tuple[str, ...]  # train's validation metrics on labelled val pairs, in order
    selection: str | None  # the one of them that picks best.pt (None: -val_loss)
    selection_greater: bool  # its direction
    test_metrics: tuple[str, ...]  # metrics.json, in order (scoring.TEST_METRICS computes them)
    register_metric: str  # register.metric: null picks it; the first thing a user looks at
    prior: Prior | None  # scoring.prior_logits' guess (None: the task has its own baseline)
    details: tuple[Detail, ...] = ()  # evaluate's per-task outputs (per_class.json, plots)

    def outputs(self, num_classes: int) -> int:
        """Head outputs per pair for a dataset with ``num_classes`` classes (answers)."""
        return 1 if self.single_output else max(num_classes, 1)

    @property
    def captions(self) -> bool:
        """The task generates captions with a decoder (no fusion head)."""
        return self.loss == "caption"

    def selection_key(self) -> str | None:
        """The train report's name of the selection metric: minus sign when lower is better."""
        if self.selection is None:
            return None
        return self.selection if self.selection_greater else f"-{self.selection}"


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "multiclass", single_output=False, target="label", loss="cross_entropy",
            decode="argmax", needs_labels=True, val_metrics=("val_accuracy",),
            selection="val_accuracy", selection_greater=True,
            test_metrics=("accuracy", "macro_f1"), register_metric="accuracy",
            prior="majority", details=("per_class", "confusion"),
        ),
        TaskSpec(
            "binary", single_output=True, target="label", loss="binary_cross_entropy",
            decode="positive", needs_labels=True, val_metrics=("val_accuracy", "val_macro_f1"),
            selection="val_macro_f1", selection_greater=True,
            test_metrics=("accuracy", "macro_f1", "auroc"), register_metric="macro_f1",
            prior="majority", details=("per_class", "confusion", "roc"),
        ),
        TaskSpec(
            "multilabel", single_output=False, target="labels", loss="multilabel_bce",
            decode="multi_hot", needs_labels=True, val_metrics=("val_micro_f1", "val_map"),
            selection="val_map", selection_greater=True,
            test_metrics=("micro_f1", "macro_f1", "map"), register_metric="map",
            prior="prevalence", details=("per_class",),
        ),
        TaskSpec(
            "regression", single_output=True, target="value", loss="mse", decode="value",
            needs_labels=True, val_metrics=("val_mae", "val_rmse"), selection="val_rmse",
            selection_greater=False, test_metrics=("mae", "rmse", "r2"),
            register_metric="rmse", prior="mean", details=("predicted_vs_true",),
        ),
        TaskSpec(
            "vqa", single_output=False, target="label", loss="cross_entropy", decode="argmax",
            needs_labels=True, val_metrics=("val_accuracy",), selection="val_accuracy",
            selection_greater=True, test_metrics=("vqa_accuracy",),
            register_metric="vqa_accuracy", prior="majority", details=("per_question_type",),
        ),
        # best.pt on the token loss: CIDEr needs beam search over the val split every epoch
        TaskSpec(
            "captioning", single_output=False, target="label", loss="caption", decode="argmax",
            needs_labels=False, val_metrics=(), selection=None, selection_greater=False,
            test_metrics=("bleu4", "cider", "nn_bleu4", "nn_cider"),
            register_metric="cider", prior=None,
        ),
    )
}  # fmt: skip


def task_spec(task: str) -> TaskSpec:
    """The spec of ``task`` (a ``ModelConfig.task`` name); KeyError names the known ones."""
    try:
        return TASKS[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}") from None
