"""mmpipe.model: every fusion mode x task, InfoNCE by hand, tokenizer, encoders, freezing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmpipe.config import ModelConfig
from mmpipe.model import (
    FUSION_MODES,
    batch_targets,
    create_fusion_head,
    create_model,
    hash_tokenize,
    info_nce,
    multi_hot,
    num_outputs,
    predict_labels,
    task_loss_sum,
)

TEXTS = ["a red circle on the left, happy", "Square!", "", "two blue triangles at the top right"]


def tiny(**overrides) -> ModelConfig:
    base = dict(width=16, embed_dim=8, head_hidden=16, vocab_size=128, max_tokens=8, text_layers=1)
    return ModelConfig(**{**base, **overrides})


# one batch's targets, as the loader gives them: the third pair is unlabelled
BATCH_TARGETS = {
    "label": torch.tensor([0, 1, -1, 2]),
    "labels": torch.tensor([[0, 2], [1, -1], [-1, -1], [2, -1]]),  # multi-hot class lists
    "value": torch.tensor([0.5, 2.0, float("nan"), -1.0]),
}


@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel", "regression", "vqa"])
@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_every_fusion_and_task_forward_backward(fusion, task):
    torch.manual_seed(0)
    model = create_model(tiny(fusion=fusion, task=task), num_classes=3)
    images = torch.randn(4, 3, 32, 32)  # (B, 3, H, W)
    out = model(images, TEXTS)
    k = num_outputs(task, 3)
    assert out["image_emb"].shape == (4, 8) and out["text_emb"].shape == (4, 8)
    assert out["logits"].shape == (4, k)
    assert torch.allclose(out["image_emb"].norm(dim=-1), torch.ones(4), atol=1e-5)
    assert torch.allclose(out["text_emb"].norm(dim=-1), torch.ones(4), atol=1e-5)
    batch = {**BATCH_TARGETS, "label": torch.tensor([0, 1, -1, 2 if k > 2 else 1])}
    t_sum, n = task_loss_sum(out["logits"], batch_targets(batch, task), task)
    assert n == 3
    loss = info_nce(out["image_emb"], out["text_emb"], out["logit_scale"]) + t_sum / n
    loss.backward()
    assert model.logit_scale.grad is not None
    head_grads = [q.grad for q in model.head.parameters() if q.requires_grad]
    assert head_grads and all(g is not None for g in head_grads)
    enc = model.image_encoder if fusion != "text_only" else model.text_encoder
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in enc.parameters())


def test_info_nce_matches_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * img @ txt.T = [[2, 1.2], [0, 1.6]]
    i2t = (
        -(
            math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
            + math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
        )
        / 2
    )
    t2i = (
        -(
            math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
            + math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
        )
        / 2
    )
    assert info_nce(img, txt, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    # distinct groups == no groups; a shared group makes both captions positives
    assert info_nce(img, txt, scale, torch.tensor([5, 7])).item() == pytest.approx((i2t + t2i) / 2)
    same = info_nce(img, txt, scale, torch.tensor([5, 5])).item()
    row0 = -0.5 * (F.log_softmax(torch.tensor([2.0, 1.2]), 0).sum())
    row1 = -0.5 * (F.log_softmax(torch.tensor([0.0, 1.6]), 0).sum())
    col0 = -0.5 * (F.log_softmax(torch.tensor([2.0, 0.0]), 0).sum())
    col1 = -0.5 * (F.log_softmax(torch.tensor([1.2, 1.6]), 0).sum())
    assert same == pytest.approx(float((row0 + row1) / 2 + (col0 + col1) / 2) / 2, rel=1e-6)


def test_hash_tokenizer_is_stateless_and_padded():
    ids, mask = hash_tokenize(["Red, red circle!", "x"], vocab_size=100, max_tokens=3)
    assert ids.shape == (2, 3) and ids[0, 0] == 1 and ids[1, 0] == 1  # cls first
    assert ids[0, 1] == ids[0, 2]  # case-folded, punctuation split: "red" == "Red"
    assert mask.tolist() == [[True, True, True], [True, True, False]] and ids[1, 2] == 0
    assert torch.equal(hash_tokenize(["x"], 100, 3)[0], hash_tokenize(["x"], 100, 3)[0])
    assert int(ids.max()) < 100


@pytest.mark.parametrize("encoder", ["lstm", "transformer"])
@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_text_encoders_ignore_padding(encoder, pool):
    torch.manual_seed(0)
    model = create_model(tiny(text_encoder=encoder, text_pool=pool, max_tokens=16), 2).eval()
    alone = model.encode_text(["a circle"])
    padded = model.encode_text(["a circle", "a very long caption with many many words in it"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


@pytest.mark.parametrize("encoder", ["cnn", "resnet"])
def test_image_encoders_shapes(encoder):
    model = create_model(tiny(image_encoder=encoder), 2)
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 8)
    xi, xt = model.features(torch.randn(2, 3, 32, 32), ["a", "b"])
    assert xi.shape == (2, 16) and xt.shape == (2, 16)


def test_freezing_keeps_encoder_fixed_and_in_eval_mode():
    model = create_model(tiny(freeze_image=True, freeze_text=True), 2).train()
    assert not model.image_encoder.training and not model.text_encoder.training
    assert model.head.training
    out = model(torch.randn(2, 3, 32, 32), ["a", "b"])
    (
        out["logits"].sum() + info_nce(out["image_emb"], out["text_emb"], out["logit_scale"])
    ).backward()
    assert all(q.grad is None for q in model.image_encoder.parameters())
    assert all(q.grad is None for q in model.text_encoder.parameters())
    assert model.image_proj.weight.grad is not None


def test_weighted_alpha_fixed_or_learned():
    fixed = create_fusion_head("weighted", 4, 6, 2, hidden=8, dropout=0.1, alpha=0.25)
    assert not any(n == "alpha_logit" for n, _ in fixed.named_parameters())
    assert float(fixed.alpha) == 0.25
    learned = create_fusion_head("weighted", 4, 6, 2, hidden=8, dropout=0.1, alpha=None)
    assert float(learned.alpha.detach()) == 0.5 and "alpha_logit" in dict(
        learned.named_parameters()
    )


def test_late_fusion_cannot_see_interactions_but_concat_can():
    """XOR of one image bit and one text bit: concat fits it, late (additive logits) cannot."""
    torch.manual_seed(0)
    bi, bt = torch.randint(0, 2, (256,)), torch.randint(0, 2, (256,))
    xi, xt = F.one_hot(bi, 2).float(), F.one_hot(bt, 2).float()  # (N, 2): survives LayerNorm
    y = (bi != bt).long()
    acc = {}
    for mode in ("concat", "late"):
        head = create_fusion_head(mode, 2, 2, 2, hidden=32, dropout=0.0)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(300):
            loss = F.cross_entropy(head(xi, xt), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc[mode] = float((head(xi, xt).argmax(-1) == y).float().mean())
    assert acc["concat"] > 0.99 and acc["late"] < 0.8


def test_logit_scale_init_and_clamp():
    model = create_model(tiny(init_temperature=0.05), 2)
    assert float(model.scale().detach()) == pytest.approx(20.0, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model.scale().detach()) == pytest.approx(100.0, rel=1e-5)


def test_task_loss_ignores_unlabelled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    total, n = task_loss_sum(logits, torch.tensor([0, -1, -1]), "multiclass")
    assert n == 1 and total.item() == pytest.approx(
        F.cross_entropy(logits[:1], torch.tensor([0])).item()
    )
    none, n0 = task_loss_sum(logits, torch.tensor([-1, -1, -1]), "multiclass")
    assert n0 == 0 and none.item() == 0.0 and none.requires_grad is False


def test_multilabel_loss_is_bce_on_the_multi_hot_labels():
    """Several classes per pair: the target is multi-hot; -1 pads a short list, and a pair
    without any class is unlabelled."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, -3.0], [9.0, 9.0, 9.0]])
    lists = torch.tensor([[0, 2], [1, -1], [-1, -1]])
    hot = multi_hot(lists, 3)
    assert hot.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    total, n = task_loss_sum(logits, lists, "multilabel")
    want = F.binary_cross_entropy_with_logits(logits[:2], hot[:2], reduction="sum") / 3
    assert n == 2 and total.item() == pytest.approx(want.item())


def test_regression_loss_is_mse_on_the_values_and_skips_nan():
    out = torch.tensor([[1.0], [2.0], [3.0]])
    total, n = task_loss_sum(out, torch.tensor([1.5, float("nan"), 1.0]), "regression")
    assert n == 2 and total.item() == pytest.approx(0.25 + 4.0)
    assert predict_labels(out, "regression").tolist() == [1.0, 2.0, 3.0]


def test_freezing_all_but_the_last_blocks():
    """unfreeze_last: a frozen encoder's last N layer groups train; the rest stay in eval."""
    model = create_model(tiny(text_encoder="transformer", text_layers=2), 2)
    model.set_frozen(image=True, text=True, unfreeze_last=1)
    image_groups = model.image_encoder.layer_groups()
    assert all(not q.requires_grad for g in image_groups[:-1] for q in g.parameters())
    assert all(q.requires_grad for q in image_groups[-1].parameters())
    text_groups = model.text_encoder.layer_groups()  # embeddings, 2 layers, the final norm
    assert len(text_groups) == 4 and all(q.requires_grad for q in text_groups[-1].parameters())
    model.train()
    assert not text_groups[1].training and text_groups[-1].training
    model.set_frozen(image=False, text=False)
    assert all(q.requires_grad for q in model.parameters()) and model.text_encoder.training


def test_train_params_carry_exactly_the_model_config():
    """The train section is the model's config plus training settings; model_args() is the
    model part, which mmpipe.model reads and checkpoints store."""
    from mmpipe.config import TrainParams

    p = TrainParams(fusion="gated", width=32, lr=0.5, epochs=3)
    args = p.model_args()
    assert type(args) is ModelConfig and (args.fusion, args.width) == ("gated", 32)
    assert set(ModelConfig.model_fields) < set(TrainParams.model_fields)
    assert "lr" not in args.model_dump() and "epochs" not in args.model_dump()
    torch.manual_seed(0)
    a = create_model(args, 2).state_dict()
    torch.manual_seed(0)
    defaults = {"embed_dim": 128, "head_hidden": 256, "vocab_size": 8192, "max_tokens": 32}
    b = create_model(tiny(fusion="gated", width=32, text_layers=2, **defaults), 2).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
