"""run_train on tiny hand-written WebDataset shards: learning, exact resume, SIGTERM, AMP, checkpoints.

Shards follow CONTRACT.md (jpg/txt/json samples + manifest.json) and are read only through
mmpipe.data.create_dataloader, like the real stage. The toy task mirrors the synthetic data:
the label says whether the image's palette (warm/cool) agrees with the caption's sentiment.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from mmpipe.config import TrainParams
from mmpipe.errors import InputError
from mmpipe.train import load_model, run_train, warmup_cosine

WARM = [(220, 80, 40), (240, 160, 40), (200, 40, 60)]
COOL = [(40, 80, 220), (40, 180, 160), (90, 60, 200)]
POSITIVE, NEGATIVE = ["happy", "lovely", "great"], ["sad", "awful", "gloomy"]
CLASSES = ["agree", "disagree"]


def _image(rng: random.Random, warm: bool, shape: str, left: bool, size: int) -> bytes:
    img = Image.new("RGB", (size, size), rng.choice(WARM if warm else COOL))
    draw = ImageDraw.Draw(img)
    x0 = size // 8 if left else size // 2 + size // 8
    box = (x0, size // 3, x0 + size // 3, size // 3 + size // 3)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(250, 250, 250))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples(split: str, n_images: int, captions: int, size: int, seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:{split}")
    rows = []
    for i in range(n_images):
        warm, shape, left = rng.random() < 0.5, rng.choice(["circle", "square"]), rng.random() < 0.5
        jpg = _image(rng, warm, shape, left, size)
        image_id = hashlib.sha256(jpg + f"{split}{i}".encode()).hexdigest()[:16]
        for c in range(captions):
            positive = rng.random() < 0.5
            mood = rng.choice(POSITIVE if positive else NEGATIVE)
            text = f"a {shape} on the {'left' if left else 'right'}, {mood}"
            label = CLASSES[0] if warm == positive else CLASSES[1]
            pair_id = f"{image_id}{c:02d}"
            meta = {"pair_id": pair_id, "image_id": image_id, "caption_id": pair_id,
                    "label": label, "label_index": CLASSES.index(label), "split": split,
                    "source": "synthetic", "image_path": f"/x/{i}.jpg",
                    "meta": {"main_shape": shape}, "copy": 0}
            rows.append({"__key__": pair_id, "jpg": jpg, "txt": text.encode(),
                         "json": json.dumps(meta).encode()})
    return sorted(rows, key=lambda r: r["__key__"])


def write_tiny_shards(
    out: Path, n_images: dict[str, int] | None = None, captions: int = 2, size: int = 32,
    per_shard: int = 16, seed: int = 0,
) -> Path:
    """CONTRACT-format shards + manifest.json; returns ``out``."""
    import webdataset as wds

    n_images = n_images or {"train": 16, "val": 8}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"params_hash": "tiny", "image_size": size, "classes": CLASSES, "splits": {}}
    for split, n in n_images.items():
        rows, shards = _samples(split, n, captions, size, seed), []
        for k in range(0, len(rows), per_shard):
            name = f"{split}-{k // per_shard:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for row in rows[k : k + per_shard]:
                    sink.write(row)
            shards.append({"name": name, "count": len(rows[k : k + per_shard]),
                           "bytes": (out / name).stat().st_size, "sha256": ""})
        manifest["splits"][split] = {"count": len(rows), "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def tiny_params(**overrides) -> TrainParams:
    """A model small enough to train in a second on CPU."""
    base = dict(
        width=16, embed_dim=16, head_hidden=16, vocab_size=256, max_tokens=12, text_layers=1,
        epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, num_workers=0, shuffle_buffer=100,
        device="cpu", amp="off", seed=0,
    )
    return TrainParams(**{**base, **overrides})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


def _params_equal(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loss_decreases_and_report(shards, tmp_path):
    seen = []
    p = tiny_params(epochs=6, dropout=0.0)
    report = run_train(shards, p, tmp_path, on_epoch_end=lambda e, m: seen.append((e, m)))
    hist = report["history"]
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    for key in ("train_contrastive", "train_task", "val_accuracy", "lr", "temperature",
                "samples_per_s", "val_r1_in_batch"):
        assert key in hist[-1]
    saved = json.loads((tmp_path / "train_report.json").read_text())
    assert saved["steps"] == report["steps"] == 6 * 4  # 32 samples / batch 8
    assert (tmp_path / "best.pt").is_file()


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.2)
    assert warmup_cosine(3, 4, 20) == pytest.approx(0.8)
    assert warmup_cosine(4, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("stop_after", "accum"), [(4, 1), (3, 1), (1, 2)])
def test_resume_is_exact(shards, tmp_path, stop_after, accum):
    p = tiny_params(grad_accum=accum)
    straight = run_train(shards, p, tmp_path / "a")
    part = run_train(shards, p, tmp_path / "b", max_steps=stop_after)
    assert part["interrupted"] and part["steps"] == stop_after
    resumed = run_train(shards, p, tmp_path / "b", resume=True)
    assert resumed["steps"] == straight["steps"]
    _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert resumed["history"][-1]["val_loss"] == straight["history"][-1]["val_loss"]


def test_resume_detects_a_difference(shards, tmp_path):
    """The equality above can fail: another seed gives other weights."""
    run_train(shards, tiny_params(), tmp_path / "a")
    run_train(shards, tiny_params(seed=1), tmp_path / "b")
    with pytest.raises(AssertionError):
        _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_sigterm_checkpoints_and_resumes(shards, tmp_path):
    p = tiny_params()

    def kill_after_first_epoch(epoch, metrics):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run_train: flag, save, return

    before = signal.getsignal(signal.SIGTERM)
    report = run_train(shards, p, tmp_path / "b", on_epoch_end=kill_after_first_epoch)
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    assert report["interrupted"]
    state = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 1, 5)
    run_train(shards, p, tmp_path / "b", resume=True)
    run_train(shards, p, tmp_path / "a")
    _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_checkpoint_is_weights_only_and_reloads(shards, tmp_path):
    run_train(shards, tiny_params(epochs=1), tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "step", "epoch",
                "batch_in_epoch", "params", "classes", "num_classes", "model_config"):
        assert key in state, key
    assert state["classes"] == CLASSES and state["num_classes"] == 2
    model, info = load_model(tmp_path / "best.pt")
    assert info["image_size"] == 32 and info["params"]["width"] == 16
    images, texts = torch.zeros(3, 3, 32, 32), ["a circle", "a square on the left, sad", ""]
    out = model(images, texts)
    assert out["logits"].shape == (3, 2) and out["image_emb"].shape == (3, 16)
    again, _ = load_model(tmp_path / "best.pt")
    assert torch.equal(again(images, texts)["logits"], out["logits"])


def test_bf16_autocast_on_cpu(shards, tmp_path):
    report = run_train(shards, tiny_params(epochs=1, amp="bf16"), tmp_path)
    assert report["amp"] == "bfloat16"
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_other_tasks_train(shards, tmp_path, task):
    report = run_train(shards, tiny_params(epochs=1, task=task), tmp_path)
    last = report["history"][-1]
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    assert ("val_mae" in last) == (task == "regression")


def test_user_errors(shards, tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        run_train(tmp_path / "nowhere", tiny_params(), tmp_path / "o")
    with pytest.raises(InputError, match="fp16"):
        run_train(shards, tiny_params(amp="fp16"), tmp_path / "o")
    with pytest.raises(InputError, match="divisible"):
        run_train(shards, tiny_params(batch_size=9, grad_accum=2), tmp_path / "o")
    with pytest.raises(InputError, match="checkpoint"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp(shards, tmp_path, amp):
    report = run_train(shards, tiny_params(epochs=1, device="cuda", amp=amp), tmp_path)
    assert report["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))


@pytest.mark.gpu
def test_cuda_compile(shards, tmp_path):
    report = run_train(shards, tiny_params(epochs=1, device="cuda", compile=True), tmp_path)
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))
