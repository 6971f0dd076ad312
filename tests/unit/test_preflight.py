"""The check right after align: splits that cannot train or evaluate the run stop it in one line
naming the split, the counts and the params to change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mmpipe.config import load_params
from mmpipe.errors import InputError
from mmpipe.preflight import check_splits

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
SPLITS = ("train", "val", "test")


def _report(images, pairs, labelled=None):
    """align's report.json counts: images, pairs and labelled pairs per split (train/val/test)."""
    labelled = pairs if labelled is None else labelled
    return {
        "images_per_split": dict(zip(SPLITS, images, strict=True)),
        "pairs_per_split": dict(zip(SPLITS, pairs, strict=True)),
        "labelled_pairs_per_split": dict(zip(SPLITS, labelled, strict=True)),
        "pairs": sum(pairs),
        "labelled_pairs": sum(labelled),
    }


@pytest.fixture
def params():
    return load_params(REPO_PARAMS)


def test_enough_of_every_split_passes(params, caplog):
    with caplog.at_level(logging.WARNING):
        check_splits(_report([80, 10, 11], [240, 30, 33]), params)
    assert not caplog.records


def test_an_empty_test_split_names_the_split_counts_and_params(params):
    # the README's flickr30k sample under the default ratios: 2 captioned images, both in train
    with pytest.raises(InputError) as exc:
        check_splits(_report([2, 0, 0], [25, 0, 0], [0, 0, 0]), params)
    text = str(exc.value)
    assert "\n" not in text
    assert text.startswith("the test split has 0 images (images per split 2/0/0, pairs 25/0/0")
    assert "align.test=0.1" in text and "raise align.test" in text


def test_an_empty_train_split_fails(params):
    with pytest.raises(InputError, match=r"^the train split is empty .* raise align.train"):
        check_splits(_report([0, 3, 9], [0, 9, 27]), params)


def test_too_few_test_images_for_any_k_fails_and_for_some_warns(params, caplog):
    # unlabelled, retrieval is all evaluate scores and register promotes on: it fails
    with pytest.raises(InputError, match=r"test split has 1 images.*recall@1 needs more than 1"):
        check_splits(_report([40, 5, 1], [120, 15, 3], [0, 0, 0]), params)
    # labelled, the run is judged on its task metric: R@K only warns
    with caplog.at_level(logging.WARNING):
        check_splits(_report([40, 5, 1], [120, 15, 3]), params)
    assert "recall@1,5,10 will be 1.0 whatever the model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_splits(_report([40, 5, 6], [120, 15, 18]), params)
    assert "recall@10 will be 1.0 whatever the model: the test split has 6 images" in caplog.text


def test_unlabelled_pairs_cannot_give_a_labelled_register_metric(params):
    def register(metric):
        return params.model_copy(
            update={"register": params.register.model_copy(update={"metric": metric})}
        )

    unlabelled = _report([80, 10, 11], [240, 30, 33], [0, 0, 0])
    with pytest.raises(InputError, match=r"register.metric='accuracy' needs labelled .*none"):
        check_splits(unlabelled, register("accuracy"))
    check_splits(unlabelled, register(None))  # null: retrieval's mean_r1 without labels
