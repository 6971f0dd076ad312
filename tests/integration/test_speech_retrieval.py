"""Real audio: the coco-mini captions spoken by Debian's espeak-ng (offline, at test time), paired
with their photos, through ingest -> align -> shard -> train -> evaluate with an audio encoder.

espeak-ng writes 22.05 kHz mono WAV: ingest validates every clip, shard resamples it to 16 kHz
FLAC, and evaluate reports retrieval for every modality pair (speech <-> photo among them).
`.ci/run` installs espeak-ng (.ci/install-espeak.sh).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mmpipe import pipeline
from mmpipe.config import load_params
from mmpipe.layout import Layout
from tests.conftest import SHARED_DATA, TINY_OVERRIDES

ESPEAK = shutil.which("espeak-ng")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(ESPEAK is None, reason="needs Debian espeak-ng (.ci/install-espeak.sh)"),
]


def spoken_coco(dest: Path) -> int:
    """coco-mini as a folder source whose `speech` column is each caption, spoken; rows."""
    src = SHARED_DATA / "coco-mini"
    shutil.copytree(src / "images", dest / "images")
    (dest / "speech").mkdir()
    doc = json.loads((src / "captions.json").read_text())
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    with (src / "labels.csv").open(newline="") as fh:
        labels = {row["file_name"]: row["label"] for row in csv.DictReader(fh)}
    rows = []
    for ann in doc["annotations"]:
        wav = f"speech/{ann['id']}.wav"
        subprocess.run([ESPEAK, "-w", str(dest / wav), ann["caption"]], check=True, timeout=60)
        name = files[ann["image_id"]]
        rows.append({"image": f"images/{name}", "caption": ann["caption"],
                     "label": labels.get(name, ""), "speech": wav})  # fmt: skip
    with (dest / "captions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def test_spoken_captions_are_retrieved_against_their_photos(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    n = spoken_coco(tmp_path / "data")
    overrides = [
        *TINY_OVERRIDES, "ingest.source=folder", f"ingest.root={tmp_path / 'data'}",
        "ingest.audio_column=speech", "align.train=0.5", "align.val=0.25", "align.test=0.25",
        "train.audio_encoder=cnn", "train.epochs=2", "train.batch_size=16",
    ]  # fmt: skip
    params, layout = load_params(None, overrides), Layout(tmp_path / "proj")
    for stage in ("ingest", "curate", "align", "shard", "train", "evaluate"):
        pipeline.run_stage(stage, params, layout)
    report = json.loads((layout.stage_dir("ingest") / "report.json").read_text())
    assert report["audio"]["seen"] == report["audio"]["accepted"] == n  # every clip decodes
    assert report["audio"]["captions_with_audio"] == report["captions"]["accepted"] == n
    manifest = json.loads((layout.stage_dir("shard") / "manifest.json").read_text())
    assert (
        manifest["audio"]["pairs_with_audio_per_split"] == manifest["align_report_pairs_per_split"]
    )
    metrics = json.loads((layout.stage_dir("evaluate") / "metrics.json").read_text())
    assert metrics["n_test_audio"] == metrics["n_test_pairs"] > 0
    for pair in ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t"):
        assert 0.0 <= metrics[f"{pair}_r1"] <= metrics[f"{pair}_r5"] <= 1.0, pair
