"""`mmpipe predict` with a tri-modal model: a clip per pair, featurised as in the shards; a pair
without a clip is masked; bad clips and clips for an image-text model are clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from mmpipe import predict
from mmpipe.errors import InputError
from tests.conftest import colour_image, save_random_checkpoint, tiny_model_config


def tone(path, hz: float, seconds: float = 0.5, rate: int = 22050, channels: int = 2):
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)
    sf.write(path, np.repeat(wave[:, None], channels, axis=1), rate)
    return path


@pytest.fixture
def trimodal(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_model_config(audio_encoder="cnn")
    ckpt = save_random_checkpoint(tmp_path / "models" / "best.pt", cfg)
    image = tmp_path / "red.png"
    colour_image("red", "circle").save(image)
    return tmp_path, ckpt, image


def test_a_clip_is_featurised_exactly_as_in_the_shards(trimodal):
    from mmpipe.audio import clip_features, encode_flac

    root, ckpt, _ = trimodal
    clip = tone(root / "a.wav", 440.0)  # stereo 22.05 kHz: mixed and resampled as shard does
    got = predict.load_predictor(ckpt).load_audio([clip, None])
    assert got["audio_mask"].tolist() == [True, False]
    torch.testing.assert_close(got["audio"][0], torch.from_numpy(clip_features(encode_flac(clip))))
    assert got["audio"][1].abs().sum() == 0


def test_the_clip_enters_the_prediction_and_a_missing_clip_is_masked(trimodal):
    root, ckpt, image = trimodal
    p = predict.load_predictor(ckpt)
    low, high = tone(root / "low.wav", 220.0), tone(root / "high.wav", 3000.0)
    without = p.classify_pair(image, "a red circle")
    with_low = p.classify_pair(image, "a red circle", low)
    with_high = p.classify_pair(image, "a red circle", high)
    assert with_low["probabilities"] != with_high["probabilities"]
    # masked: exactly the image-text head's prediction (late fusion adds nothing)
    x = p.load_images([image])
    logits = p.model.classify(x, ["a red circle"])
    expected = predict.decode_logits(logits.float(), p.task, p.classes)[0]
    assert without["probabilities"] == pytest.approx(expected["probabilities"])
    assert with_low["similarity"] == pytest.approx(without["similarity"])


def test_bad_clips_name_the_file_and_the_reason(trimodal, tmp_path):
    _, ckpt, image = trimodal
    p = predict.load_predictor(ckpt)
    fake = tmp_path / "fake.wav"
    fake.write_bytes(b"not audio at all" * 10)
    with pytest.raises(InputError, match=r"fake\.wav: audio clip rejected: not_audio"):
        p.classify_pair(image, "x", fake)
    long = tone(tmp_path / "long.wav", 440.0, seconds=31.0, rate=8000, channels=1)
    with pytest.raises(InputError, match=r"long\.wav: .*audio_too_long"):
        p.classify_pair(image, "x", long)
    with pytest.raises(InputError, match=r"missing\.wav: cannot read"):
        p.classify_pair(image, "x", tmp_path / "missing.wav")


def test_a_clip_for_an_image_text_model_is_an_error(tmp_path):
    ckpt = save_random_checkpoint(tmp_path / "models" / "best.pt")
    image = tmp_path / "red.png"
    colour_image("red", "circle").save(image)
    p = predict.load_predictor(ckpt)
    clip = tone(tmp_path / "a.wav", 440.0)
    with pytest.raises(InputError, match="trained without audio"):
        p.classify_pair(image, "a red circle", clip)
    assert p.classify_pair(image, "a red circle")["label"]  # no clip: as before


def test_cli_predict_takes_an_audio_clip(trimodal, capsys):
    from mmpipe.cli import main

    root, ckpt, image = trimodal
    clip = tone(root / "a.wav", 440.0)
    args = ["predict", str(image), "a red circle", "--audio", str(clip), "--model", str(ckpt)]
    assert main([*args, "--project-dir", str(root)]) in (0, None)
    out = json.loads(capsys.readouterr().out)
    expected = predict.load_predictor(ckpt).classify_pair(image, "a red circle", clip)
    assert out["probabilities"] == pytest.approx(expected["probabilities"])
