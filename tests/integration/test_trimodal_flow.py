"""Audio as a third modality through the nightly flow: the built-in data with a chord per image
(a few images without one), an audio encoder, retrieval for every modality pair, registration."""

from __future__ import annotations

import pytest

from flows.nightly import nightly
from tests.conftest import TINY_OVERRIDES, make_project, read_json

pytestmark = pytest.mark.slow

AUDIO = ["ingest.synthetic.audio=true", "train.audio_encoder=cnn"]


def test_trimodal_run_end_to_end_with_samples_missing_audio(harness, tmp_path):
    project = make_project(tmp_path / "proj", TINY_OVERRIDES + AUDIO)
    out = nightly(project_dir=str(project))
    assert out["promoted"] and out["version"] == 1
    audio = read_json(project / "data/ingest/report.json")["audio"]
    # seed 0, 48 images: images 3, 11, 23 and 27 have no clip; their captions are kept
    assert audio["captions_without_audio"] == 4 * 2 and audio["rejected"] == 0
    assert audio["captions_with_audio"] == 44 * 2 == audio["accepted"] * 2
    manifest = read_json(project / "data/shards/manifest.json")
    per_split = manifest["audio"]["pairs_with_audio_per_split"]
    assert sum(per_split.values()) == 88
    pairs = manifest["align_report_pairs_per_split"]
    assert sum(pairs.values()) == 96 and per_split["train"] < pairs["train"]  # masked ones train
    metrics = read_json(project / "reports/metrics.json")
    for pair in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t"):
        assert 0.0 <= metrics[f"{pair}_r1"] <= metrics[f"{pair}_r5"] <= 1.0, pair
    assert metrics["n_test_audio"] == per_split["test"] > 0
