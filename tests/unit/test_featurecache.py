"""The frozen-feature cache, feature-cached gradient accumulation, zero-step pretrained runs and
best.pt chosen on validation retrieval when nothing is labelled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpipe import featurecache
from mmpipe.checkpoint import read_checkpoint
from mmpipe.distributed import Dist
from mmpipe.model import create_model
from mmpipe.train import compute_loss, create_trainer, grad_cache_backward, run_train
from tests.conftest import tiny_train_params, write_mood_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_mood_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    return write_mood_shards(tmp_path_factory.mktemp("unlabelled"), unlabelled_every=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["model"]


def test_locked_tower_trains_the_same_from_cached_features(shards, tmp_path):
    p = tiny_train_params(epochs=2, freeze_image=True, dropout=0.0)
    cached = run_train(shards, p, tmp_path / "a", cache_dir=tmp_path / "cache")
    plain = run_train(shards, p, tmp_path / "b")  # no cache dir: pixels every epoch
    for c, u in zip(cached["history"], plain["history"], strict=True):
        for key in ("train_loss", "val_loss", "val_accuracy", "val_mean_r1"):
            assert c[key] == pytest.approx(u[key], rel=1e-5, abs=1e-6), key
    # the same weights up to float rounding (batched convs differ in the last bits; Adam turns a
    # ~1e-9 gradient's sign into a full lr-sized step on a few elements)
    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-2), name
        assert (a[name] - b[name]).abs().mean() < 1e-4, name
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 3  # one per train/val shard (2 train, 1 val)


def test_cache_is_reused_by_content_and_rebuilt_when_it_does_not_match(shards, tmp_path):
    import mmpipe.data as data
    from mmpipe.data import create_dataloader  # noqa: F401 - the loader decodes no pixels

    p = tiny_train_params(epochs=1, freeze_image=True)
    run_train(shards, p, tmp_path / "a", cache_dir=tmp_path / "cache")
    decoded = []
    real = data.decode_rgb
    data.decode_rgb = lambda b: decoded.append(1) or real(b)
    try:
        t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards,
                           cache_dir=tmp_path / "cache")  # fmt: skip
        assert t.cache_report["shards_reused"] == 3 and t.cache_report["shards_built"] == 0
        run_train(shards, p, tmp_path / "b", cache_dir=tmp_path / "cache")
    finally:
        data.decode_rgb = real
    assert decoded == []  # neither the train nor the val loader decoded an image
    # a torn file is rebuilt, not trusted
    victim = sorted((tmp_path / "cache").rglob("*.pt"))[0]
    victim.write_bytes(b"torn")
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path / "cache")
    assert t.cache_report["shards_built"] == 1


def test_trainable_weights_or_online_augment_turn_the_cache_off(shards, tmp_path):
    p = tiny_train_params(freeze_image=False)
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path)
    assert t.features is None
    aug = [{"name": "HorizontalFlip", "params": {"p": 0.5}}]
    p = tiny_train_params(freeze_image=True, online_augment=aug)
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path)
    assert t.features is None
    p = tiny_train_params(freeze_image=True, online_augment=aug, feature_cache="on")
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path)
    assert t.features is not None


def test_digest_covers_the_locked_weights(shards):
    model = create_model(tiny_train_params(freeze_image=True).model_args(), 2)
    plan = featurecache.plan(model, "auto", False, 0)
    before = featurecache.encoder_digest(model, plan, _manifest(shards))
    with torch.no_grad():
        next(model.image_encoder.parameters()).add_(1.0)
    assert featurecache.encoder_digest(model, plan, _manifest(shards)) != before


def test_unlocked_last_groups_run_on_the_cached_prefix(shards, tmp_path):
    p = tiny_train_params(epochs=1, freeze_image=True, unfreeze_last=1, image_encoder="cnn")
    model = create_model(p.model_args(), 2)
    model.set_frozen(True, False, 1)
    # the scratch CNN has no encode_from: no prefix cache, the pixels are used
    assert featurecache.plan(model, "auto", False, 1) is None


def test_grad_cache_gives_the_gradient_of_one_big_contrastive_batch(shards):
    """Two micro-batches with grad_cache = the whole batch at once (dropout off)."""
    big = tiny_train_params(dropout=0.0, batch_size=8, lambda_task=0.0)
    acc = tiny_train_params(dropout=0.0, batch_size=8, lambda_task=0.0, grad_accum=2,
                            grad_cache=True)  # fmt: skip
    t_big = create_trainer(big, Dist(), _manifest(shards))
    t_acc = create_trainer(acc, Dist(), _manifest(shards))
    t_acc.model.load_state_dict(t_big.model.state_dict())
    from mmpipe.data import create_dataloader

    batch = next(iter(create_dataloader(shards, "train", 8)))
    loss, _ = compute_loss(t_big, batch)
    loss.backward()
    half = [{k: (v[:4] if hasattr(v, "__getitem__") else v) for k, v in batch.items()},
            {k: (v[4:] if hasattr(v, "__getitem__") else v) for k, v in batch.items()}]  # fmt: skip
    grad_cache_backward(t_acc, half)
    for (name, a), b in zip(t_big.model.named_parameters(), t_acc.model.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name


def test_grad_cache_run_trains(shards, tmp_path):
    p = tiny_train_params(epochs=2, grad_accum=2, grad_cache=True)
    report = run_train(shards, p, tmp_path)
    assert report["steps"] == 2 * 4 and report["history"][-1]["train_loss"] > 0


def test_unlabelled_run_picks_best_on_validation_retrieval(unlabelled, tmp_path):
    report = run_train(unlabelled, tiny_train_params(epochs=2), tmp_path)
    assert report["selection_metric"] == "val_mean_r1"
    row = report["history"][-1]
    assert 0.0 <= row["val_mean_r1"] <= 1.0 and "val_i2t_r1" in row and "val_t2i_r1" in row
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["best_metric"] == max(h["val_mean_r1"] for h in report["history"])


def test_zero_epochs_saves_the_model_as_loaded(shards, tmp_path):
    p = tiny_train_params(epochs=0)
    report = run_train(shards, p, tmp_path)
    assert report["steps"] == 0 and report["epochs_completed"] == 0
    assert (tmp_path / "best.pt").is_file() and "val_loss" in report["history"][0]


def _manifest(shards: Path) -> dict:
    from mmpipe.manifest import read_manifest

    return read_manifest(shards)


@pytest.mark.gpu
def test_cached_locked_tower_trains_on_cuda_with_bf16(shards, tmp_path):
    p = tiny_train_params(epochs=1, freeze_image=True, device="cuda", amp="bf16")
    report = run_train(shards, p, tmp_path / "m", cache_dir=tmp_path / "cache")
    assert report["device"].startswith("cuda") and report["amp"] == "bfloat16"
    assert torch.isfinite(torch.tensor(report["history"][-1]["train_loss"]))
    assert list((tmp_path / "cache").rglob("*.pt"))


@pytest.mark.gpu
def test_conv_image_tower_runs_channels_last_on_cuda(shards):
    p = tiny_train_params(device="cuda", amp="bf16", image_encoder="efficientnet_lite0",
                          text_encoder="minilm", freeze_image=True, unfreeze_last=2)  # fmt: skip
    t = create_trainer(p, Dist(), _manifest(shards))
    assert t.channels_last
    from mmpipe.data import create_dataloader

    batch = next(iter(create_dataloader(shards, "train", 8, pin_memory=True)))
    loss, _ = compute_loss(t, batch)
    loss.backward()
    assert torch.isfinite(loss)


def _trains_as_without_cache(shards, tmp_path):
    """Both towers locked: training from the feature cache (tmp_path/cache) gives the losses and
    val R@1 of training from pixels and text; the params, for more checks on the cache."""
    p = tiny_train_params(epochs=2, freeze_image=True, freeze_text=True, dropout=0.0)
    cached = run_train(shards, p, tmp_path / "a", cache_dir=tmp_path / "cache")
    plain = run_train(shards, p, tmp_path / "b")
    for c, u in zip(cached["history"], plain["history"], strict=True):
        assert c["train_loss"] == pytest.approx(u["train_loss"], rel=1e-5)
        assert c["val_mean_r1"] == pytest.approx(u["val_mean_r1"])
    return p


def test_locked_text_tower_is_cached_too(shards, tmp_path):
    p = _trains_as_without_cache(shards, tmp_path)
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path / "cache")
    assert t.text_features is not None and t.features is not None
    assert set(t.cache_report["towers"]) == {"image", "text"}
    assert all(r["shards_built"] == 0 for r in t.cache_report["towers"].values())
    # a token-level head reads the text tokens: the text tower is then not cached
    p = tiny_train_params(freeze_text=True, fusion="cross_attention")
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path / "c2")
    assert t.text_features is None


def test_both_caches_on_image_samples_train_as_the_pixels_do(tmp_path):
    """Shards of one sample per image (2 captions each): image features per sample, text
    features per caption row; training from them matches training from pixels and text."""
    shards = write_mood_shards(tmp_path / "shards", layout="image")
    p = _trains_as_without_cache(shards, tmp_path)
    t = create_trainer(p, Dist(), _manifest(shards), shard_dir=shards, cache_dir=tmp_path / "cache")
    manifest = _manifest(shards)
    images = sum(manifest.count(s) for s in ("train", "val"))
    captions = sum(manifest.pairs(s) for s in ("train", "val"))
    assert len(t.features.index) == images and len(t.text_features.index) == captions == 2 * images
