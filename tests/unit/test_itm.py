"""Image-text matching (ITM): negatives sampled from the batch, the head on the token-level
fusions, its training beside (or instead of) the task loss, and evaluate's ITM metrics."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mmpipe.config import EvaluateParams, ModelConfig
from mmpipe.model import Encoded, create_model
from mmpipe.model.itm import itm_loss, itm_pairs, sample_negatives
from tests.conftest import tiny_train_params, write_mood_shards

TEXTS = ["a red circle on the left", "two blue squares", "x", "a sad face on the right"]


def tiny(**overrides) -> ModelConfig:
    base = dict(width=16, embed_dim=8, head_hidden=16, vocab_size=128, max_tokens=12, text_layers=1)
    return ModelConfig(**{**base, **overrides})


def test_negatives_never_share_the_image_and_follow_the_similarity():
    groups = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor(
        [[9.0, 9.0, 8.0, -9.0], [9.0, 9.0, 8.0, -9.0], [0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 9.0]]
    )
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_negatives(sim, groups, gen)[0] for _ in range(200)])
    assert (groups[draws] != groups).all()  # a caption of the same image is no negative
    assert (draws[:, 0] == 2).float().mean() > 0.95  # hard: the most similar other image
    again = sample_negatives(sim, groups, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, draws[0])  # seeded: the same negatives


def test_a_row_without_another_image_gets_no_negative():
    ei = Encoded(torch.randn(2, 4), torch.randn(2, 3, 4), torch.ones(2, 3).bool())
    et = Encoded(torch.randn(2, 5), torch.randn(2, 2, 5), torch.ones(2, 2).bool())
    _, _, labels = itm_pairs(ei, et, torch.zeros(2, 2), torch.tensor([7, 7]))
    assert labels.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("fusion", ["cross_attention", "single_stream"])
def test_itm_forward_backward_with_masks(fusion):
    """Padded captions and a sample whose image tokens are all masked: finite ITM logits,
    gradients reach the ITM head, the fusion head and both encoders."""
    torch.manual_seed(0)
    model = create_model(tiny(fusion=fusion, itm_weight=1.0), 2).train()
    images = torch.randn(4, 3, 32, 32)
    ei, et = model.encode(images, TEXTS)
    ei = Encoded(ei.pooled, ei.tokens, ei.mask.clone())
    ei.mask[3] = False  # a sample missing its image tokens is masked, not an error
    sim = model.encode_image_features(ei) @ model.encode_text_features(et).T
    logits, labels = model.itm(ei, et, sim, torch.arange(4))
    assert logits.shape == labels.shape == (12,) and torch.isfinite(logits).all()
    assert labels.sum() == 4
    itm_loss(logits, labels).backward()
    for part in (model.itm_head, model.head, model.image_encoder, model.text_encoder):
        assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in part.parameters())


def test_forward_returns_itm_outputs_only_when_asked():
    model = create_model(tiny(fusion="single_stream", itm_weight=0.5), 2)
    images = torch.randn(4, 3, 32, 32)
    assert "itm_logits" not in model(images, TEXTS)
    out = model(images, TEXTS, itm_groups=torch.tensor([0, 0, 1, 2]))
    assert out["itm_logits"].shape == out["itm_labels"].shape
    assert out["itm_labels"].sum() == 4  # the positives, then the sampled negatives


def test_itm_needs_a_token_level_fusion_and_is_off_by_default():
    assert ModelConfig().itm_weight == 0
    assert create_model(tiny(fusion="single_stream"), 2).itm_head is None
    with pytest.raises(ValidationError, match="token-level fusion"):
        tiny(fusion="concat", itm_weight=1.0)


def test_models_without_itm_start_from_the_same_weights():
    """Adding the ITM option changed no existing model: same init for itm_weight=0."""
    torch.manual_seed(3)
    a = create_model(tiny(fusion="cross_attention"), 2).state_dict()
    torch.manual_seed(3)
    b = create_model(tiny(fusion="cross_attention", itm_weight=1.0), 2).state_dict()
    assert set(b) - set(a) == {"itm_head.weight", "itm_head.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_itm_alone_trains_on_unlabelled_data_and_beats_chance(tmp_path):
    """No labels, no contrastive loss: ITM alone picks best.pt (through the val loss) and
    separates matching from sampled pairs on the test split, with the same negatives each run."""
    from mmpipe.evaluate import run_evaluate
    from mmpipe.io import read_json
    from mmpipe.train import run_train

    splits = {"train": 48, "val": 16, "test": 16}
    shards = write_mood_shards(tmp_path / "shards", splits, unlabelled_every=1)
    p = tiny_train_params(
        fusion="single_stream", itm_weight=1.0, lambda_contrastive=0.0, epochs=20, batch_size=16
    )
    report = run_train(shards, p, tmp_path / "models")
    val_itm = [row["val_itm"] for row in report["history"]]
    assert min(val_itm) < val_itm[0] - 0.05
    e = EvaluateParams(batch_size=16)
    metrics = run_evaluate(shards, tmp_path / "models", e, tmp_path / "r")
    assert metrics["itm_auroc"] > 0.6, metrics  # chance: 0.5
    assert metrics["n_itm_pairs"] == 3 * 32  # each pair, a wrong caption, a wrong image
    again = run_evaluate(shards, tmp_path / "models", e, tmp_path / "again")
    assert again["itm_auroc"] == metrics["itm_auroc"]  # deterministic negatives
    assert "itm" not in read_json(tmp_path / "r" / "evaluation_report.json")["skipped"]


def test_itm_metrics_are_absent_with_a_reason_for_pooled_fusions(tmp_path):
    from mmpipe.evaluate import run_evaluate
    from mmpipe.io import read_json
    from mmpipe.train import run_train

    shards = write_mood_shards(tmp_path / "shards", {"train": 8, "val": 4, "test": 4})
    run_train(shards, tiny_train_params(epochs=1), tmp_path / "models")
    metrics = run_evaluate(
        shards, tmp_path / "models", EvaluateParams(ablation=False), tmp_path / "r"
    )
    assert not any(k.startswith("itm") for k in metrics)
    skipped = read_json(tmp_path / "r" / "evaluation_report.json")["skipped"]
    assert "no ITM head" in skipped["itm"] and "concat" in skipped["itm"]


def test_a_checkpoint_saved_before_itm_loads_and_predicts_the_same(tmp_path):
    """Old model_args have no itm_weight: the model rebuilds without an ITM head, same logits."""
    from mmpipe.checkpoint import load_model
    from tests.conftest import save_random_checkpoint, tiny_model_config

    torch.manual_seed(0)
    cfg = tiny_model_config(fusion="cross_attention")
    path = save_random_checkpoint(tmp_path / "best.pt", cfg)
    state = torch.load(path, weights_only=True)
    for section in ("model_args", "params"):
        del state[section]["itm_weight"]  # what a checkpoint written before ITM holds
    torch.save(state, path)
    model, info = load_model(path)
    assert model.itm_head is None and info["model_args"]["itm_weight"] == 0
    fresh = create_model(cfg, 2).eval()
    fresh.load_state_dict(state["model"])
    images = torch.randn(2, 3, 24, 24)
    texts = ["a red circle", "a blue square on the left"]
    torch.testing.assert_close(model.classify(images, texts), fresh.classify(images, texts))
