"""mmpipe.audio: clip validation with named rejects, the mel scale and log-mel features, and
audio through ingest -> align -> shard -> loader (a missing clip is masked, not an error)."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from PIL import Image

from mmpipe.align import run_align
from mmpipe.audio import (
    FRAMES,
    HOP,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    check_audio_bytes,
    hz_to_mel,
    log_mel,
    mel_filterbank,
    mel_to_hz,
)
from mmpipe.config import AlignParams, AudioParams, IngestParams, ShardParams
from mmpipe.data import create_dataloader
from mmpipe.ingest import run_ingest
from mmpipe.io import read_json, read_jsonl
from mmpipe.shard import run_shard

LIMITS = AudioParams(max_seconds=2.0, min_sample_rate=8000, max_sample_rate=48000)


def tone(hz: float = 440.0, seconds: float = 0.5, rate: int = 16000, channels: int = 1):
    """A sine tone, (T, channels) float32."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def clip_bytes(fmt: str = "WAV", **kw) -> bytes:
    rate = kw.get("rate", 16000)
    buf = io.BytesIO()
    sf.write(buf, tone(**kw), rate, format=fmt)
    return buf.getvalue()


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), ((seed * 37) % 256, (seed * 91) % 256, 120)).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- mel scale


def test_slaney_mel_scale_known_values():
    # librosa.hz_to_mel's documented examples (Slaney): 60 Hz -> 0.9; 110/220/440 -> 1.65/3.3/6.6
    assert float(hz_to_mel(60.0)) == pytest.approx(0.9)
    assert np.allclose(hz_to_mel([110.0, 220.0, 440.0]), [1.65, 3.3, 6.6])
    # linear part ends at 1 kHz = 15 mel; above, 27 mels per factor 6.4
    assert float(hz_to_mel(1000.0)) == pytest.approx(15.0)
    assert float(hz_to_mel(6400.0)) == pytest.approx(42.0)
    assert float(mel_to_hz(3.0)) == pytest.approx(200.0)
    hz = np.array([0.0, 50.0, 999.0, 1000.0, 3000.0, 8000.0])
    assert np.allclose(mel_to_hz(hz_to_mel(hz)), hz)


def test_htk_mel_scale_known_values():
    # 2595 log10(1 + f / 700): 700 Hz -> 2595 log10(2) = 781.17...
    assert float(hz_to_mel(700.0, htk=True)) == pytest.approx(2595 * math.log10(2))
    assert float(hz_to_mel(1000.0, htk=True)) == pytest.approx(999.9855, abs=1e-3)
    assert np.allclose(mel_to_hz(hz_to_mel([60.0, 4000.0], htk=True), htk=True), [60.0, 4000.0])


def test_filterbank_matches_a_hand_computed_filter():
    # rate 8000, n_fft 8: bins at 0, 1000, 2000, 3000, 4000 Hz; one Slaney filter over 0..4000 Hz
    # edges: 0, mel_to_hz(hz_to_mel(4000) / 2), 4000; peak = 1000 exp(ln(6.4)/27 * (m/2 - 15))
    top = 15 + 27 * math.log(4.0) / math.log(6.4)  # hz_to_mel(4000) = 35.1638...
    peak = 1000 * math.exp(math.log(6.4) / 27 * (top / 2 - 15))  # 1194.2... Hz
    height = 2.0 / 4000.0  # Slaney norm: area 1 over the filter's 4000 Hz base
    want = [0.0, 1000 / peak, min(2000 / peak, 2000 / (4000 - peak)), 1000 / (4000 - peak), 0.0]
    fb = mel_filterbank(8000, 8, 1)
    assert fb.shape == (1, 5)
    assert np.allclose(fb[0], np.array(want) * height)


def test_filterbank_shape_and_unit_area():
    fb = mel_filterbank(SAMPLE_RATE, 2048, 40)
    assert fb.shape == (40, 1025) and (fb >= 0).all()
    bin_hz = SAMPLE_RATE / 2048
    areas = fb.sum(axis=1) * bin_hz
    assert np.allclose(areas[5:], 1.0, atol=0.02)  # wide filters: the Riemann sum is exact-ish
    assert (np.diff(fb.argmax(axis=1)) >= 0).all()  # centres ascend


def test_log_mel_of_a_tone_peaks_in_its_band():
    for hz in (300.0, 1000.0, 3000.0):
        feats = log_mel(tone(hz, 1.0)[:, 0])
        assert feats.shape == (N_MELS, SAMPLE_RATE // HOP + 1)
        band = int(feats[:, 10:-10].mean(dim=1).argmax())
        fb = mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS)
        centre_hz = fb[band].argmax() * SAMPLE_RATE / N_FFT
        assert abs(centre_hz - hz) < 0.15 * hz + 80, (hz, centre_hz)
    batch = log_mel(np.stack([tone(300.0)[:, 0], tone(3000.0)[:, 0]]))
    assert batch.shape[0] == 2 and not np.allclose(batch[0], batch[1])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (clip_bytes(), None),
        (clip_bytes("FLAC"), None),
        (clip_bytes("OGG"), None),
        (clip_bytes(rate=44100, channels=2), None),
        (png_bytes(), "not_audio"),
        (b"hello, this is text, not sound" * 10, "not_audio"),
        (clip_bytes(seconds=3.0), "audio_too_long"),
        (clip_bytes(seconds=0.01), "audio_too_short"),
        (clip_bytes(rate=4000), "bad_sample_rate"),
        (clip_bytes(rate=96000), "bad_sample_rate"),
        (clip_bytes(channels=3), "too_many_channels"),
    ],
)
def test_check_audio_bytes(data, reason):
    got, detail, _ = check_audio_bytes(data, LIMITS)
    assert got == reason, detail
    assert (detail == "") == (reason is None)


def test_corrupt_flac_is_rejected_corrupt():
    data = bytearray(clip_bytes("FLAC", seconds=1.0))
    data[200:4000] = bytes(range(256)) * 14 + bytes(3800 - 256 * 14)  # frames destroyed
    reason, detail, _ = check_audio_bytes(bytes(data), LIMITS)
    assert reason == "corrupt", detail


# --------------------------------------------------------------------------- the stages


def write_collection(root: Path) -> None:
    """Images with captions; the audio column holds a good clip, each kind of bad one, a
    missing file and an empty cell."""
    audio = {
        "a/good0.wav": clip_bytes(hz=300.0),
        "a/good1.flac": clip_bytes("FLAC", hz=600.0, rate=22050),
        "a/good2.ogg": clip_bytes("OGG", hz=900.0, rate=44100, channels=2),
        "a/long.wav": clip_bytes(seconds=3.0),
        "a/slow.wav": clip_bytes(rate=4000),
        "a/image.wav": png_bytes(99),
        "a/empty.wav": b"",
        "a/clip.mp4": clip_bytes(),
    }
    for rel, data in audio.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    again = [str(root / "a/good0.wav"), "a/good1.flac", "a/../a/good2.ogg", "../outside.wav"]
    refs = [*audio, "a/missing.wav", "", *again]
    rows = []
    (root / "img").mkdir()
    for i, ref in enumerate(refs):
        (root / f"img/{i}.png").write_bytes(png_bytes(i))
        rows.append({"image": f"img/{i}.png", "caption": f"a picture number {i}", "sound": ref})
    pd.DataFrame(rows).to_csv(root / "captions.csv", index=False)


def ingest(root: Path, out: Path, **kw) -> dict:
    p = IngestParams(source="folder", root=str(root), workers=1, audio=LIMITS, **kw)
    return run_ingest(p, out)


def test_ingest_rejects_each_bad_clip_and_keeps_its_caption(tmp_path):
    write_collection(tmp_path / "data")
    report = ingest(tmp_path / "data", tmp_path / "ingest", audio_column="sound")
    audio = report["audio"]
    assert audio["by_reason"] == {
        "audio_too_long": 1, "bad_extension": 1, "bad_sample_rate": 1, "missing_audio": 1,
        "not_audio": 1, "path_escapes_root": 1, "zero_bytes": 1,
    }  # fmt: skip
    # an absolute path inside the root and a/../a/ are the same clips, validated once
    assert audio["seen"] == audio["accepted"] + audio["rejected"] == 3 + 7
    assert audio["captions_with_audio"] == 6 and audio["captions_without_audio"] == 8
    # no caption is lost to a bad clip: the modality is masked instead
    assert report["captions"]["accepted"] == report["captions"]["seen"] == 14
    rejects = [r for r in read_jsonl(tmp_path / "ingest" / "rejects.jsonl") if r["kind"] == "audio"]
    assert {r["file"]: r["reason"] for r in rejects}["a/image.wav"] == "not_audio"
    records = pq.read_table(tmp_path / "ingest" / "records.parquet").to_pylist()
    by_image = {r["image_ref"]: r["audio_path"] for r in records}
    assert by_image["img/0.png"] == "a/good0.wav" and by_image["img/3.png"] is None
    assert by_image["img/9.png"] is None  # empty cell
    assert by_image["img/10.png"] == "a/good0.wav" and by_image["img/12.png"] == "a/good2.ogg"
    assert all("sound" not in r["meta"] for r in records)  # moved out of meta


def test_without_audio_column_nothing_changes(tmp_path):
    write_collection(tmp_path / "data")
    report = ingest(tmp_path / "data", tmp_path / "ingest")
    assert "audio" not in report
    records = pd.read_parquet(tmp_path / "ingest" / "records.parquet")
    assert "audio_path" not in records.columns and "sound" in records["meta"][0]


def test_audio_through_align_shard_and_loader(tmp_path):
    write_collection(tmp_path / "data")
    ingest(tmp_path / "data", tmp_path / "ingest", audio_column="sound")
    run_align(tmp_path / "ingest", AlignParams(train=0.6, val=0.2, test=0.2), tmp_path / "align")
    pairs = pq.read_table(tmp_path / "align" / "pairs.parquet").to_pylist()
    with_audio = {p["pair_id"]: p["audio_path"] for p in pairs}
    assert sum(a is not None for a in with_audio.values()) == 6
    params = ShardParams(image_size=16, workers=1, copies=1, maxcount=100)
    run_shard(tmp_path / "align", tmp_path / "ingest", params, tmp_path / "shards")
    manifest = read_json(tmp_path / "shards" / "manifest.json")
    assert manifest["audio"]["sample_rate"] == SAMPLE_RATE
    assert sum(manifest["audio"]["pairs_with_audio_per_split"].values()) == 6
    # every sample of an image (train copies too) carries the clip of its i-th pair (json's
    # "pairs"), when that pair has one, as member {i}.flac; no other member is FLAC
    want = sum(2 if p["split"] == "train" else 1 for p in pairs if p["audio_path"])
    flacs = []
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            metas = {
                name.removesuffix(".json"): json.loads(tf.extractfile(name).read())
                for name in tf.getnames()
                if name.endswith(".json")
            }
            for name in tf.getnames():
                if name.endswith(".flac"):
                    key, i, _ = name.split(".")
                    assert with_audio[metas[key]["pairs"][int(i)]["pair_id"]] is not None
                    clip, rate = sf.read(io.BytesIO(tf.extractfile(name).read()))
                    assert rate == SAMPLE_RATE and clip.ndim == 1 and len(clip) > 0
                    flacs.append(name)
    assert len(flacs) == want
    loader = create_dataloader(tmp_path / "shards", "train", batch_size=64)
    batch = next(iter(loader))
    assert batch["audio"].shape == (len(batch["key"]), 1, N_MELS, FRAMES)
    mask = batch["audio_mask"]
    for key, present, feats in zip(batch["key"], mask, batch["audio"], strict=True):
        assert bool(present) == (with_audio[key.split("_aug")[0]] is not None)
        assert bool(feats.abs().sum() > 0) == bool(present)  # absent = zeros, masked


# --------------------------------------------------------------------------- model


def test_audio_model_forward_backward_with_a_masked_clip():
    import torch

    from mmpipe.model import audio_info_nce, create_model
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    model = create_model(tiny_model_config(audio_encoder="cnn"), num_classes=3)
    images = torch.randn(4, 3, 32, 32)
    texts = ["a red circle", "a blue square", "a star", "a cross"]
    audio = torch.randn(4, 1, N_MELS, FRAMES)
    mask = torch.tensor([True, True, False, True])
    out = model(images, texts, audio=audio, audio_mask=mask)
    assert out["audio_emb"].shape == (4, 8) and out["logits"].shape == (4, 3)
    # a masked clip leaves that row's logits exactly as without audio
    plain = model(images, texts)
    assert "audio_emb" not in plain
    model.eval()
    with torch.no_grad():
        a = model(images, texts, audio=audio, audio_mask=mask)["logits"]
        b = model(images, texts)["logits"]
        c = model(images, texts, audio=torch.randn_like(audio), audio_mask=mask)["logits"]
    assert torch.equal(a[2], b[2]) and torch.equal(a[2], c[2])
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[0], c[0])
    model.train()
    loss = audio_info_nce(out["image_emb"], out["text_emb"], out["audio_emb"], mask,
                          out["logit_scale"])  # fmt: skip
    (loss + out["logits"].sum()).backward()
    assert loss.item() > 0
    grads = [p.grad for p in model.audio_encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # fewer than two clips: no negative, a zero loss that keeps the graph
    one = torch.tensor([False, False, True, False])
    assert audio_info_nce(out["image_emb"], out["text_emb"], out["audio_emb"], one,
                          out["logit_scale"]).item() == 0.0  # fmt: skip


def test_model_without_audio_encoder_ignores_audio_inputs():
    import torch

    from mmpipe.model import create_model
    from tests.conftest import tiny_model_config

    model = create_model(tiny_model_config(), num_classes=2)
    assert model.audio_encoder is None and "audio_encoder" not in model.config
    out = model(torch.randn(2, 3, 32, 32), ["a", "b"], audio=torch.randn(2, 1, N_MELS, FRAMES))
    assert "audio_emb" not in out


# --------------------------------------------------------------------------- synthetic


def test_synthetic_audio_is_a_mood_chord_and_leaves_images_and_captions_alone(tmp_path):
    from mmpipe.config import SyntheticParams
    from mmpipe.synthetic import CHORD_ROOTS_HZ, CHORDS, generate

    base = dict(n_images=40, captions_per_image=2, image_size=32)
    generate(tmp_path / "plain", SyntheticParams(**base), workers=1)
    generate(tmp_path / "audio", SyntheticParams(**base, audio=True), workers=1)
    plain = pd.read_csv(tmp_path / "plain" / "captions.csv")
    tri = pd.read_csv(tmp_path / "audio" / "captions.csv", keep_default_na=False)
    pd.testing.assert_frame_equal(plain, tri.drop(columns="audio"))
    for name in plain["image"]:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "audio" / name).read_bytes()
    assert (tri["audio"] == "").any() and (tri["audio"] != "").mean() > 0.8  # a few masked
    # the clip's third tells the mood: the best-matching triad is major (4 semitones) for a
    # positive image, minor (3) for a negative one
    for _, row in tri[tri["audio"] != ""].drop_duplicates("image").iterrows():
        clip, rate = sf.read(tmp_path / "audio" / row["audio"])
        spectrum = np.abs(np.fft.rfft(clip))
        freqs = np.fft.rfftfreq(len(clip), 1 / rate)
        energy = {
            (root, mood): sum(
                spectrum[np.argmin(abs(freqs - root * 2 ** (s / 12)))] for s in CHORDS[mood]
            )
            for root in CHORD_ROOTS_HZ
            for mood in CHORDS
        }
        assert max(energy, key=energy.get)[1] == row["mood"], row["audio"]


# --------------------------------------------------------------------------- train / evaluate


def test_audio_encoder_without_audio_shards_is_a_clear_error():
    from mmpipe.config import TrainParams
    from mmpipe.errors import InputError
    from mmpipe.manifest import AudioEntry, Manifest
    from mmpipe.train import check_task_data

    with pytest.raises(InputError, match="shards carry no audio"):
        check_task_data(TrainParams(audio_encoder="cnn"), Manifest(splits={}, classes=["a", "b"]))
    audio = AudioEntry(sample_rate=16000)
    check_task_data(TrainParams(audio_encoder="cnn"), Manifest(splits={}, audio=audio))


def test_audio_retrieval_scores_every_pair_by_image_group():
    import torch

    from mmpipe.evaluate import SplitOutputs, audio_retrieval

    eye = torch.eye(4)
    # 3 images; image 0 has two captions; the caption of image 2 has no clip
    out = SplitOutputs(
        image_ids=["a", "b", "c"],
        image_emb=[eye[0], eye[1], eye[2]],
        text_emb=[torch.stack([eye[0], eye[0], eye[1], eye[2]])],
        text_to_image=[0, 0, 1, 2],
        audio_emb=[torch.stack([eye[0], eye[0], eye[1], eye[3]])],
        audio_mask=[torch.tensor([True, True, True, False])],
    )
    m = audio_retrieval(out, [1, 5])
    assert m["n_test_audio"] == 3.0
    for pair in ("i2a", "a2i", "t2a", "a2t"):
        assert m[f"{pair}_r1"] == 1.0, pair
    # clips that match the wrong image: image<->audio fails, each direction
    out.audio_emb = [torch.stack([eye[1], eye[1], eye[0], eye[3]])]
    m = audio_retrieval(out, [1])
    assert m["i2a_r1"] == m["a2i_r1"] == m["t2a_r1"] == m["a2t_r1"] == 0.0
    assert audio_retrieval(SplitOutputs(), [1]) == {}  # no audio model: nothing reported


def test_audio_shards_are_identical_for_one_and_two_workers(tmp_path):
    write_collection(tmp_path / "data")
    ingest(tmp_path / "data", tmp_path / "ingest", audio_column="sound")
    run_align(tmp_path / "ingest", AlignParams(train=0.6, val=0.2, test=0.2), tmp_path / "align")
    for workers in (1, 2):
        params = ShardParams(image_size=16, workers=workers, copies=1, maxcount=100)
        run_shard(tmp_path / "align", tmp_path / "ingest", params, tmp_path / f"w{workers}")
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert any(n.endswith(".tar") for n in names)
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
