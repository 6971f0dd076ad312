"""The training-distribution profile (mmpipe.ood): a real photo is flagged for a model trained on
the generated shapes, the synthetic test images are not, and the profile survives a round trip
through its .npz file without pickles."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmpipe import ood, pipeline
from mmpipe.config import load_params
from mmpipe.layout import Layout
from mmpipe.predict import load_predictor
from tests.conftest import REPO, TINY_OVERRIDES

ELEPHANT = "An elephant walking through tall grass on a sunny day"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny generated data (96 images), its shards and a model trained for one epoch."""
    from mmpipe.train import run_train

    root = tmp_path_factory.mktemp("ood")
    more = [*TINY_OVERRIDES, "ingest.synthetic.n_images=96"]
    params, layout = load_params(REPO / "params.yaml", more), Layout(root)
    for stage in ("ingest", "curate", "align", "shard"):
        pipeline.run_data_stage(stage, params, layout)
    run_train(layout.shard_dir, params.train, layout.model_dir)
    predictor = load_predictor(layout.model_dir, shard_dir=layout.shard_dir)
    predictor.profile = ood.create_profile(predictor.model, layout.shard_dir)
    return layout, predictor


def _test_split(layout: Layout) -> tuple[list[str], list[str]]:
    pairs = pq.read_table(layout.align_dir / "pairs.parquet").to_pandas()
    test = pairs[pairs["split"] == "test"]
    root = layout.ingest_dir / "source"
    return sorted({str(root / p) for p in test["image_path"]}), list(test["caption"])


def test_a_photo_is_out_of_distribution_a_synthetic_test_image_is_not(project, shared_data):
    layout, predictor = project
    photos = sorted(str(p) for p in (shared_data / "coco-mini" / "images").glob("*.jpg"))
    flagged = predictor.input_warnings(photos, [ELEPHANT])
    assert len(flagged) == len(photos) + 1  # every photo, and the elephant caption
    assert all("out of the training distribution" in w for w in flagged)
    assert any("image_pixels" in w for w in flagged)  # colours and edges, whatever the model
    assert "few of its words occur in the training captions" in flagged[0]  # captions sort first

    images, captions = _test_split(layout)
    assert predictor.input_warnings(images[:1], captions[:1]) == []
    # the thresholds are validation percentiles: few unseen synthetic inputs fail any check
    assert len(predictor.input_warnings(images, captions)) <= 0.1 * (len(images) + len(captions))


def test_profile_round_trip_keeps_the_answers(project, tmp_path):
    _, predictor = project
    profile = predictor.profile
    path = tmp_path / ood.PROFILE_FILE
    profile.save(path)
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {k: z[k].dtype.kind for k in ("vocabulary", "image_pixels")} == {
            "vocabulary": "U",
            "image_pixels": "f",
        }
    loaded = ood.load_profile(path)
    assert loaded.thresholds == pytest.approx(profile.thresholds)
    assert loaded.vocabulary == profile.vocabulary
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    before = profile.scores(ood.image_statistics(x), captions=[ELEPHANT])
    after = loaded.scores(ood.image_statistics(x), captions=[ELEPHANT])
    for check in before:
        np.testing.assert_allclose(before[check], after[check], rtol=1e-6)


def test_image_statistics_are_histograms():
    x = torch.zeros(2, 3, 8, 8)  # mid-grey, flat
    x[1, :, :, 4:] = 1.0  # half white: one strong vertical edge
    stats = ood.image_statistics(x)
    assert stats.shape == (2, ood.COLOUR_LEVELS**3 + len(ood.GRADIENT_EDGES) + 1)
    torch.testing.assert_close(stats[:, :64].sum(1), torch.ones(2))
    assert stats[0, 64] == 1.0  # no gradient anywhere
    assert stats[1, -1] > 0  # the edge lands in the top gradient bin


def test_word_coverage():
    vocab = {"a", "red", "circle"}
    np.testing.assert_allclose(
        ood.word_coverage(["A red circle!", "a blue star", "123"], vocab), [1.0, 1 / 3, 1.0]
    )
