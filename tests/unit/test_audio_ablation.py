"""evaluate's ablation with a tri-modal model: rows for audio alone and for the image + text
head with and without the clip, on the same frozen features; a pair without a clip is masked."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import soundfile as sf
import torch

from mmpipe.config import EvaluateParams
from mmpipe.io import read_json
from tests.conftest import (
    MOOD_CLASSES,
    save_random_checkpoint,
    tiny_model_config,
    write_mood_shards,
)


def _chord(label: str) -> bytes:
    """A 0.3 s mono 16 kHz FLAC tone whose pitch says the label (what the clip adds)."""
    hz = 330.0 if label == MOOD_CLASSES[0] else 1760.0
    t = np.arange(int(0.3 * 16000)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32), 16000, format="FLAC")
    return buf.getvalue()


def write_audio_shards(out, n_images: dict[str, int]):
    """Mood shards whose pairs carry a clip of their label (every 7th pair none), as shard
    writes them: a `flac` member and the manifest's `audio` entry."""
    import webdataset as wds

    from tests.conftest import shard_hashes

    write_mood_shards(out, n_images, per_shard=10_000)
    manifest = json.loads((out / "manifest.json").read_text())
    with_audio = {}
    for split, entry in manifest["splits"].items():
        name = entry["shards"][0]["name"]
        rows = list(wds.WebDataset(str(out / name), shardshuffle=False, empty_check=False))
        n = 0
        with wds.TarWriter(str(out / name)) as sink:
            for i, row in enumerate(rows):
                sample = {k: row[k] for k in ("__key__", "jpg", "txt", "json")}
                if i % 7:
                    sample["flac"] = _chord(json.loads(row["json"])["label"])
                    n += 1
                sink.write(sample)
        entry["shards"][0].update(shard_hashes(out / name))
        with_audio[split] = n
    manifest["audio"] = {"sample_rate": 16000, "pairs_with_audio_per_split": with_audio}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_the_ablation_shows_what_the_clip_adds(tmp_path):
    from mmpipe.evaluate import AUDIO_ABLATION_MODES, run_evaluate

    torch.manual_seed(0)
    shards = write_audio_shards(tmp_path / "shards", {"train": 24, "test": 12})
    cfg = tiny_model_config(audio_encoder="cnn")
    save_random_checkpoint(tmp_path / "models" / "best.pt", cfg, classes=MOOD_CLASSES)
    p = EvaluateParams(batch_size=16, ablation_epochs=60)
    metrics = run_evaluate(shards, tmp_path / "models", p, tmp_path / "r")
    rows = {r["fusion"]: r for r in read_json(tmp_path / "r" / "ablation.json")["results"]}
    assert set(AUDIO_ABLATION_MODES) <= set(rows)
    # the label is in the clip's pitch (6 of 7 pairs): audio alone and image + text + audio
    # beat image + text, whose random frozen features carry little of it
    assert rows["audio_only"]["accuracy"] > 0.7, rows
    assert rows["concat+audio"]["accuracy"] > rows["concat"]["accuracy"]
    assert metrics["audio_gain"] == rows["concat+audio"]["accuracy"] - rows["concat"]["accuracy"]


def test_an_image_text_model_has_no_audio_rows(tmp_path):
    from mmpipe.evaluate import run_evaluate

    torch.manual_seed(0)
    shards = write_audio_shards(tmp_path / "shards", {"train": 8, "test": 4})
    save_random_checkpoint(tmp_path / "models" / "best.pt", classes=MOOD_CLASSES)
    p = EvaluateParams(batch_size=16, ablation_epochs=1)
    metrics = run_evaluate(shards, tmp_path / "models", p, tmp_path / "r")
    rows = read_json(tmp_path / "r" / "ablation.json")["results"]
    assert not any("audio" in r["fusion"] for r in rows) and "audio_gain" not in metrics
