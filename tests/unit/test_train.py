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
        "val_r1_in_batch",
    ):
        assert key in hist[-1]
    # timings reach the epoch callback (the log, MLflow), never the versioned report
    assert "samples_per_s" in seen[-1][1] and "epoch_seconds" in seen[-1][1]
    saved = json.loads((tmp_path / "train_report.json").read_text())
    assert "seconds" not in saved and not any("seconds" in k or "per_s" in k for k in hist[-1])
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
    assert info["decode"] == "reduced"  # the manifest's shard.decode (default when unrecorded)
    images, texts = torch.zeros(3, 3, 32, 32), ["a circle", "a square on the left, sad", ""]
    out = model(images, texts)
    assert out["logits"].shape == (3, 2) and out["image_emb"].shape == (3, 16)
    again, _ = load_model(tmp_path / "best.pt")
    assert torch.equal(again(images, texts)["logits"], out["logits"])


def test_bf16_autocast_on_cpu(shards, tmp_path):
    report = run_train(shards, tiny_train_params(epochs=1, amp="bf16"), tmp_path)
    assert report["amp"] == "bfloat16"
    assert torch.isfinite(torch.tensor(report["history"][0]["train_loss"]))


@pytest.mark.parametrize("task", ["binary", "multilabel", "vqa"])
def test_other_tasks_train(shards, tmp_path, task):
    report = run_train(shards, tiny_train_params(epochs=1, task=task), tmp_path)
    last = report["history"][-1]
    assert torch.isfinite(torch.tensor(last["train_loss"]))
    assert ("val_micro_f1" in last) == (task == "multilabel")
    # best.pt on the validation twin of the metric register compares (mmpipe/taskspec.py)
    wanted = {"binary": "val_macro_f1", "multilabel": "val_map", "vqa": "val_accuracy"}[task]
    assert wanted in last and report["selection_metric"] == wanted


def test_user_errors(shards, tmp_path):
    with pytest.raises(InputError, match="manifest.json"):
        run_train(tmp_path / "nowhere", tiny_train_params(), tmp_path / "o")
    with pytest.raises(InputError, match="fp16"):
        run_train(shards, tiny_train_params(amp="fp16"), tmp_path / "o")
    with pytest.raises(InputError, match="divisible"):
        run_train(shards, tiny_train_params(batch_size=9, grad_accum=2), tmp_path / "o")
    with pytest.raises(InputError, match="checkpoint"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(InputError, match="regression but label 'agree' is not a number"):
        run_train(shards, tiny_train_params(task="regression"), tmp_path / "o")


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


# ----------------------------------------------------------------------------- tasks' training


def test_partly_labelled_data_trains_the_task_on_the_labelled_pairs(tmp_path):
    shards = write_mood_shards(tmp_path / "shards", unlabelled_every=3)
    manifest = json.loads((shards / "manifest.json").read_text())
    labelled = manifest["labelled_pairs_per_split"]["train"]
    assert 0 < labelled < manifest["splits"]["train"]["count"]
    report = run_train(shards, tiny_train_params(epochs=1), tmp_path / "m")
    assert report["task_loss"] == "on"
    row = report["history"][0]
    assert row["train_labelled_pairs"] == labelled and row["train_task"] > 0
    assert "val_accuracy" in row  # scored on the labelled val pairs


def test_unlabelled_shards_train_contrastive_only(tmp_path):
    shards = write_mood_shards(tmp_path / "shards", unlabelled_every=1)
    report = run_train(shards, tiny_train_params(epochs=1), tmp_path / "m")
    assert report["task_loss"].startswith("off: no labelled train pairs")
    row = report["history"][0]
    assert row["train_task"] == 0.0 and row["train_loss"] == row["train_contrastive"]
    # without labels best.pt is chosen on validation retrieval, not on the contrastive val loss
    # (which can rise while retrieval still improves)
    assert report["selection_metric"] == "val_mean_r1"


def test_two_stages_in_one_run_and_resume_across_the_boundary(shards, tmp_path):
    """A contrastive-only stage, then a task stage with the image encoder frozen but its last
    block: one report with both stages; stopped at the boundary and resumed, the frozen blocks
    end exactly where stage 1 left them."""
    from mmpipe.config import TrainStage

    stages = [
        TrainStage(name="pretrain", epochs=1, lambda_task=0.0),
        TrainStage(name="finetune", epochs=2, lr=1e-3, lambda_contrastive=0.0,
                   freeze_image=True, unfreeze_last=1),
    ]  # fmt: skip
    p = tiny_train_params(stages=stages)
    out, work = tmp_path / "m", tmp_path / "m.partial"  # checkpoints live in work until done
    first = run_train(shards, p, out, max_steps=4)  # 4 steps = the first stage's
    assert first["interrupted"] and first["steps"] == 4
    after_pretrain = torch.load(work / "last.pt", weights_only=True)["model"]
    report = run_train(shards, p, out, resume=True)
    assert [r["stage"] for r in report["history"]] == ["pretrain", "finetune", "finetune"]
    row = report["history"][0]
    assert row["train_loss"] == pytest.approx(row["train_contrastive"])  # no task loss
    assert [s["name"] for s in report["stages"]] == ["pretrain", "finetune"]
    assert report["stages"][1]["freezing"].startswith("image frozen (last 1 blocks trainable)")
    assert report["steps"] == 12 and report["history"][-1]["train_contrastive"] > 0
    final = torch.load(out / "last.pt", weights_only=True)["model"]
    frozen = [k for k in final if k.startswith("image_encoder.body.")]
    trainable = [k for k in final if k.startswith("image_encoder.pool.")]
    assert frozen and all(torch.equal(final[k], after_pretrain[k]) for k in frozen)
    assert any(not torch.equal(final[k], after_pretrain[k]) for k in trainable)


def test_init_from_loads_matching_weights_and_reports_the_rest(shards, tmp_path):
    from mmpipe.distributed import init_distributed
    from mmpipe.manifest import read_manifest
    from mmpipe.train import create_trainer

    run_train(shards, tiny_train_params(epochs=1), tmp_path / "source")
    source = torch.load(tmp_path / "source" / "best.pt", weights_only=True)["model"]
    # a binary head has 1 output where the source's multiclass head has 2: re-initialised
    p = tiny_train_params(task="binary", init_from=str(tmp_path / "source"))
    t = create_trainer(
        p, init_distributed("cpu"), read_manifest(shards), tmp_path / "source" / "best.pt"
    )
    own = t.model.state_dict()
    assert t.init["loaded"] == len(source) - 2 and t.init["source"].endswith("best.pt")
    assert t.init["skipped"] == sorted(f"{k} (shape differs)" for k in source
                                       if own[k].shape != source[k].shape)  # fmt: skip
    assert {k.split(" ")[0] for k in t.init["skipped"]} == set(t.init["new"])
    assert all(k.startswith("head.") for k in t.init["new"])
    assert all(torch.equal(own[k], source[k]) for k in own if k not in t.init["new"])
    report = run_train(shards, p, tmp_path / "warm")  # a path in init_from: loaded by train
    assert report["init"]["loaded"] == t.init["loaded"]
    with pytest.raises(InputError, match="names the model registry"):
        run_train(shards, tiny_train_params(init_from="champion"), tmp_path / "x")


def test_init_from_is_resolved_in_one_place(tmp_path):
    """A path is used as is; a registry source goes through the caller's fetch (None: the
    first night's champion, random init); without a fetch it is refused, never ignored."""
    from mmpipe.train import resolve_init_from

    (tmp_path / "best.pt").write_bytes(b"")
    asked = []

    def fetch(source):
        asked.append(source)
        return None if source == "champion" else tmp_path / "fetched.pt"

    assert resolve_init_from(None, fetch) is None and asked == []
    assert resolve_init_from(str(tmp_path), fetch) == tmp_path / "best.pt" and asked == []
    assert resolve_init_from("champion", fetch) is None
    assert resolve_init_from("models:/m@champion", fetch) == tmp_path / "fetched.pt"
    assert asked == ["champion", "models:/m@champion"]
    with pytest.raises(InputError, match="names the model registry"):
        resolve_init_from("runs:/abc/model")


def test_warmup_is_a_fraction_of_the_run_capped_at_half():
    from mmpipe.config import TrainParams
    from mmpipe.train import warmup_steps

    assert warmup_steps(TrainParams(warmup_steps=None), 36) == 2  # 5 % of a 36-step run
    assert warmup_steps(TrainParams(), 36) == 18  # 50 steps, capped: the lr still peaks
    assert warmup_steps(TrainParams(), 608) == 50  # the default run's schedule
    assert warmup_steps(TrainParams(warmup_steps=None, warmup_fraction=0.1), 1000) == 100
    lrs = [warmup_cosine(s, 2, 36) for s in range(36)]
    assert max(lrs) == 1.0 and lrs[-1] < 0.01


@pytest.mark.parametrize("workers", [0, 1])  # the default trains with one loader worker
def test_training_twice_gives_the_same_bytes(shards, tmp_path, workers):
    """Same data, params and machine: the checkpoints and train_report.json are byte-identical
    (what lets `dvc repro` after the nightly flow find nothing changed, models/ included)."""
    p = tiny_train_params(num_workers=workers)
    for out in ("a", "b"):
        run_train(shards, p, tmp_path / out)
    for name in ("best.pt", "last.pt", "train_report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_the_stage_time_is_logged_once(shards, tmp_path, caplog):
    caplog.set_level("INFO", logger="mmpipe.train")
    report = run_train(shards, tiny_train_params(epochs=1), tmp_path / "m")
    took = [r.getMessage() for r in caplog.records if " took " in r.getMessage()]
    assert took == [f"train stage took {report['seconds']:.1f} s"]
