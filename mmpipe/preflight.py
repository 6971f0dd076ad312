"""Before the expensive part: can align's splits train and evaluate this run at all?

Called right after align (the nightly flow, ``mmpipe run``), so a collection too small for its
split ratios stops in seconds with one line naming the split, its counts and the params to
change, not after shard, training and half of evaluate.

    check_splits(align_report, params)   InputError, or None when the run can go on

What each part needs: training a non-empty train split; evaluation test pairs, and more test
images than K for recall@K to mean anything (with K or more images R@K is 1.0 whatever the
model: the check fails when that holds for every K and warns for the Ks it holds for); the
register metric its labelled train and test pairs (``objectives``). val may be empty (training
then validates nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mmpipe.config import Params
from mmpipe.errors import InputError
from mmpipe.layout import SPLITS
from mmpipe.manifest import Manifest
from mmpipe.objectives import check_metric_for_data

log = logging.getLogger(__name__)


def split_counts(report: Mapping[str, Any]) -> str:
    """``images per split 9/1/1, pairs 45/5/5 (train/val/test)`` from align's report."""
    images, pairs = report["images_per_split"], report["pairs_per_split"]
    return (
        f"images per split {'/'.join(str(images[s]) for s in SPLITS)}, "
        f"pairs {'/'.join(str(pairs[s]) for s in SPLITS)} ({'/'.join(SPLITS)})"
    )


def check_splits(report: Mapping[str, Any], params: Params) -> None:
    """InputError naming the split, the counts and the params to change when align's splits
    cannot train and evaluate the run (see the module docstring)."""
    a, ks = params.align, params.evaluate.ks
    counts = split_counts(report)
    ratios = f"align.train={a.train:g}, align.val={a.val:g}, align.test={a.test:g}"
    if not report["pairs_per_split"]["train"]:
        raise InputError(
            f"the train split is empty ({counts}): training needs pairs; raise align.train "
            f"({ratios}) or add data"
        )
    test_images, k = report["images_per_split"]["test"], min(ks)
    labelled = bool(report["labelled_pairs"])
    if not report["pairs_per_split"]["test"] or (test_images <= k and not labelled):
        # unlabelled, retrieval is what evaluate scores and register promotes on; a labelled
        # run is judged on its task metric, and its R@K only warns below
        raise InputError(
            f"the test split has {test_images} images ({counts}): recall@{k} needs more than "
            f"{k}; raise align.test ({ratios}; the three sum to 1) or add data"
        )
    trivial = [k for k in ks if k >= test_images]
    if trivial:
        log.warning(
            "recall@%s will be 1.0 whatever the model: the test split has %d images; raise "
            "align.test (now %g) or lower evaluate.ks (now %s)",
            ",".join(map(str, trivial)), test_images, a.test, list(ks),
        )  # fmt: skip
    labelled, pairs = report["labelled_pairs"], report["pairs"]
    labels = "none" if not labelled else "all" if labelled == pairs else "partial"
    # the labels of the manifest shard will write from this report
    to_come = Manifest(
        splits={}, labels=labels, labelled_pairs_per_split=report["labelled_pairs_per_split"]
    )
    check_metric_for_data(params.register.metric, params.train.task, to_come, ks)
