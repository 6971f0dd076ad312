"""run_train on tiny WebDataset shards: learning, exact resume, SIGTERM, AMP, checkpoints.

The shards (tests/conftest.py) are read only through mmpipe.data.create_dataloader, like the real
stage. The toy task mirrors the synthetic data: the label says whether the image's palette
(warm/cool) agrees with the caption's sentiment.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from mmpipe import signals
from mmpipe.checkpoint import load_model
from mmpipe.errors import InputError
from mmpipe.signals import Interrupted
from mmpipe.train import run_train, warmup_cosine
from tests.conftest import MOOD_CLASSES, tiny_train_params, write_mood_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_mood_shards(tmp_path_factory.mktemp("shards"))


def _params_equal(a: Path, b: Path) -> None:
    sa = torch.load(a, weights_only=True)["model"]
    sb = torch.load(b, weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loss_decreases_and_report(shards, tmp_path):
    seen = []
    p = tiny_train_params(epochs=6, dropout=0.0)
    report = run_train(shards, p, tmp_path, on_epoch_end=lambda e, m: seen.append((e, m)))
    hist = report["history"]
    assert [e for e, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    for key in (
        "train_contrastive",
        "train_task",
        "val_accuracy",
        "lr",
        "temperature",
        "samples_per_s",
        "val_r1_in_batch",
    ):
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
    p = tiny_train_params(grad_accum=accum)
    straight = run_train(shards, p, tmp_path / "a")
    part = run_train(shards, p, tmp_path / "b", max_steps=stop_after)
    assert part["interrupted"] and part["steps"] == stop_after
    resumed = run_train(shards, p, tmp_path / "b", resume=True)
    assert resumed["steps"] == straight["steps"]
    _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert resumed["history"][-1]["val_loss"] == straight["history"][-1]["val_loss"]


def test_resume_detects_a_difference(shards, tmp_path):
    """The equality above can fail: another seed gives other weights."""
    run_train(shards, tiny_train_params(), tmp_path / "a")
    run_train(shards, tiny_train_params(seed=1), tmp_path / "b")
    with pytest.raises(AssertionError):
        _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")


def test_sigterm_checkpoints_raises_and_resumes(shards, tmp_path):
    p = tiny_train_params()

    def kill_after_first_epoch(epoch, metrics):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by run_train: flag, save, raise

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(
        Interrupted, match=r"SIGTERM at epoch 2, step 4; checkpoint in .*b\.partial"
    ):
        run_train(shards, p, tmp_path / "b", on_epoch_end=kill_after_first_epoch)
    assert signal.getsignal(signal.SIGTERM) == before  # handler restored
    assert not (tmp_path / "b").exists()  # nothing installed: no half-trained model to evaluate
    state = torch.load(tmp_path / "b.partial" / "last.pt", weights_only=True)
    # stopped at the next step boundary, before another micro-batch
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 0, 4)
    signals.reset()
    run_train(shards, p, tmp_path / "b", resume=True)
    run_train(shards, p, tmp_path / "a")
    _params_equal(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt")
    assert not (tmp_path / "b.partial").exists()  # installed, then the work dir removed


def test_resume_refuses_a_checkpoint_of_other_params_or_data(shards, tmp_path):
    """Yesterday's run with another seed must not pass for tonight's."""
    run_train(shards, tiny_train_params(), tmp_path / "m", max_steps=2)
    with pytest.raises(InputError, match=r"train.seed: 0 -> 1.*--resume refuses"):
        run_train(shards, tiny_train_params(seed=1), tmp_path / "m", resume=True)
    other = write_mood_shards(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="data: the shard manifest differs"):
        run_train(other, tiny_train_params(), tmp_path / "m", resume=True)
    # what does not change the result may change: the loader's workers
    report = run_train(shards, tiny_train_params(num_workers=1), tmp_path / "m", resume=True)
    assert report["steps"] == 8 and not report["interrupted"]


def test_a_fresh_run_discards_an_old_partial_and_installs_whole(shards, tmp_path, caplog):
    run_train(shards, tiny_train_params(), tmp_path / "m", max_steps=2)
    assert not (tmp_path / "m").exists() and (tmp_path / "m.partial" / "last.pt").is_file()
    report = run_train(shards, tiny_train_params(epochs=1), tmp_path / "m")
    assert "discarding the checkpoint of an interrupted run" in caplog.text
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "best.pt", "last.pt", "train_report.json"
    ]  # fmt: skip
    assert report["steps"] == 4 and not (tmp_path / "m.partial").exists()


def test_checkpoint_is_weights_only_and_reloads(shards, tmp_path):
    run_train(shards, tiny_train_params(epochs=1), tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    for key in (
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "step",
        "epoch",
        "batch_in_epoch",
        "params",
        "classes",
        "num_classes",
        "model_config",
    ):
        assert key in state, key
    assert state["classes"] == MOOD_CLASSES and state["num_classes"] == 2
    model, info = load_model(tmp_path / "best.pt")
    assert info["image_size"] == 32 and info["params"]["width"] == 16
    images, texts = torch.zeros(3, 3, 32, 32), ["a circle", "a square on the left, sad", ""]
    out = model(images, texts)
    assert out["logits"].shape == (3, 2) and out["image_emb"].shape == (3, 16)
    again, _ = load_model(tmp_path / "best.pt")
    assert torch.equal(again(images, texts)["logits"], out["logits"])


def test_bf16_autocast_on_cpu(shards, tmp_path):
    report = run_train(shards, tiny_train_params(epochs=1, amp="bf16"), tmp_path)
    assert report["amp"] == "bfloat16"
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))


@pytest.mark.parametrize("task", ["binary", "multilabel", "regression"])
def test_other_tasks_train(shards, tmp_path, task):
    report = run_train(shards, tiny_train_params(epochs=1, task=task), tmp_path)
    last = report["history"][-1]
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    assert ("val_mae" in last) == (task == "regression")


def test_user_errors(shards, tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        run_train(tmp_path / "nowhere", tiny_train_params(), tmp_path / "o")
    with pytest.raises(InputError, match="fp16"):
        run_train(shards, tiny_train_params(amp="fp16"), tmp_path / "o")
    with pytest.raises(InputError, match="divisible"):
        run_train(shards, tiny_train_params(batch_size=9, grad_accum=2), tmp_path / "o")
    with pytest.raises(InputError, match="checkpoint"):
        load_model(tmp_path / "missing.pt")


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp(shards, tmp_path, amp):
    report = run_train(shards, tiny_train_params(epochs=1, device="cuda", amp=amp), tmp_path)
    assert report["device"].startswith("cuda")
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))


@pytest.mark.gpu
def test_cuda_compile(shards, tmp_path):
    report = run_train(shards, tiny_train_params(epochs=1, device="cuda", compile=True), tmp_path)
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))
