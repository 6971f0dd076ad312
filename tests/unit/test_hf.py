"""Hugging Face models as encoders: tiny random CLIP/SigLIP/BERT saved locally, loaded through
the real loading code (offline), rebuilt from a checkpoint alone, and their losses."""

from __future__ import annotations

import shutil

import pytest
import torch

from mmpipe.checkpoint import load_model, save_checkpoint
from mmpipe.config import ModelConfig, TrainParams
from mmpipe.errors import InputError
from mmpipe.model import create_model, info_nce, sigmoid_loss
from mmpipe.model.hf import expected_image_size
from mmpipe.train import param_groups


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _images(n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pretrained_dual_encoder_brings_its_projection_temperature_and_preprocessing(tiny_hf, kind):
    from transformers import AutoModel

    loss = "sigmoid" if kind == "siglip" else "infonce"
    cfg = ModelConfig(pretrained=f"hf:{tiny_hf[kind]}", task="binary", contrastive_loss=loss)
    model = create_model(cfg, 2).eval()
    ref = AutoModel.from_pretrained(tiny_hf[kind]).eval()
    assert float(model.logit_scale.detach()) == pytest.approx(float(ref.logit_scale.detach()))
    spec = model.hf_specs["dual"]
    assert spec["preprocessing"]["image_size"] == 32
    assert expected_image_size(model.hf_specs) == (str(tiny_hf[kind]), 32)
    x = _images()
    with torch.no_grad():  # the same image embedding as the HF model with its normalisation
        pixels = ((x + 1) / 2 - torch.tensor(spec["preprocessing"]["mean"]).view(1, 3, 1, 1)) / (
            torch.tensor(spec["preprocessing"]["std"]).view(1, 3, 1, 1)
        )
        theirs = ref.get_image_features(pixel_values=pixels)
        theirs = getattr(theirs, "pooler_output", theirs)
        assert torch.allclose(model.encode_image(x), torch.nn.functional.normalize(theirs, dim=-1),
                              atol=1e-5)  # fmt: skip
    if kind == "siglip":
        assert spec["preprocessing"]["padding"] == "max_length"
        assert float(model.logit_bias.detach()) == pytest.approx(float(ref.logit_bias.detach()))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_checkpoint_alone_rebuilds_the_model_without_its_directory(tiny_hf, tmp_path, kind):
    src = tmp_path / kind
    shutil.copytree(tiny_hf[kind], src)
    cfg = ModelConfig(pretrained=f"hf:{src}", contrastive_loss="sigmoid")
    model = create_model(cfg, 0).eval()
    state = {"model": model.state_dict(), "params": {}, "model_args": cfg.model_dump(mode="json"),
             "num_classes": 0, "hf": model.hf_specs}  # fmt: skip
    save_checkpoint(state, tmp_path / "m.pt")
    shutil.rmtree(src)  # a served model never reads the path it was trained from
    loaded, _ = load_model(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(_images()), model.encode_image(_images()))
        texts = ["a dog runs", "two cats on a red mat"]
        assert torch.equal(loaded.encode_text(texts), model.encode_text(texts))


def test_separate_backbones_train_under_new_projections(tiny_hf):
    cfg = ModelConfig(image_encoder=f"hf:{tiny_hf['clip']}", text_encoder=f"hf:{tiny_hf['bert']}",
                      embed_dim=8, head_hidden=8)  # fmt: skip
    model = create_model(cfg, 3).train()
    out = model(_images(), ["a dog", "a cat"])
    assert out["image_emb"].shape == (2, 8) and out["logits"].shape == (2, 3)
    (out["image_emb"].sum() + out["text_emb"].sum()).backward()
    assert model.image_encoder.model.embeddings.patch_embedding.weight.grad is not None
    assert set(model.hf_specs) == {"vision", "text"}


def test_an_id_missing_from_the_offline_cache_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(InputError) as err:
        create_model(ModelConfig(pretrained="hf:someone/clip-not-here"), 0)
    assert "someone/clip-not-here" in str(err.value) and "download" in str(err.value)
    with pytest.raises(InputError, match="not a model directory"):
        create_model(ModelConfig(pretrained=f"hf:{tmp_path / 'x.txt'}"), 0) if (
            (tmp_path / "x.txt").write_text("x")
        ) else None


def test_pretrained_must_be_a_dual_encoder(tiny_hf):
    with pytest.raises(InputError, match="not a dual encoder"):
        create_model(ModelConfig(pretrained=f"hf:{tiny_hf['bert']}"), 0)


def test_sigmoid_loss_is_siglips_and_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * a @ a.T + bias
    labels = 2 * torch.eye(6) - 1
    reference = -torch.nn.functional.logsigmoid(labels * logits).sum() / 6
    assert torch.allclose(sigmoid_loss(a, a, scale, bias), reference)
    shuffled = a[torch.randperm(6, generator=g)]
    assert sigmoid_loss(a, a, scale, bias) < sigmoid_loss(a, shuffled, scale, bias)
    # pairs that share an image are positives, as in info_nce's groups
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert sigmoid_loss(a, a, scale, bias, groups) != sigmoid_loss(a, a, scale, bias)
    assert info_nce(a, a, scale, groups) > 0


def test_encoders_learn_at_their_own_rate(tiny_hf):
    p = TrainParams(pretrained=f"hf:{tiny_hf['clip']}", lr=1e-3, encoder_lr_scale=0.01)
    model = create_model(p.model_args(), 0)
    groups = param_groups(model, 0.05, p.lr, p.encoder_lr_scale)
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g.get("lr", p.lr), set()).update(id(q) for q in g["params"])
    encoder = {id(q) for q in model.image_encoder.parameters()}
    assert encoder <= by_lr[1e-5] and id(model.logit_scale) in by_lr[1e-3]
    assert {id(q) for q in model.image_proj.parameters()} <= by_lr[1e-3]
    assert len(param_groups(model, 0.05)) == 2  # no scale: the two groups as before


def test_unfreeze_last_counts_transformer_layers(tiny_hf):
    model = create_model(ModelConfig(pretrained=f"hf:{tiny_hf['clip']}"), 0)
    model.set_frozen(True, True, unfreeze_last=1)  # only the final norm/head group trains
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert any("post_layernorm" in n for n in trainable)
    assert not any("encoder.layers" in n for n in trainable if n.startswith("image_encoder"))
    model.set_frozen(True, True, unfreeze_last=2)
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert any("image_encoder.model.encoder.layers.1." in n for n in trainable)
    assert not any("image_encoder.model.encoder.layers.0." in n for n in trainable)


def test_gradient_checkpointing_turns_on_in_hf_towers(tiny_hf):
    from mmpipe.train import enable_grad_checkpointing

    model = create_model(ModelConfig(pretrained=f"hf:{tiny_hf['clip']}"), 0).train()
    enable_grad_checkpointing(model)
    assert model.image_encoder.model.is_gradient_checkpointing
    out = model(_images(), ["a", "b"])
    (out["image_emb"].sum() + out["text_emb"].sum()).backward()
    assert model.text_encoder.model.embeddings.token_embedding.weight.grad is not None


@pytest.mark.gpu
def test_pretrained_clip_trains_on_cuda_under_autocast(tiny_hf):
    cfg = ModelConfig(pretrained=f"hf:{tiny_hf['clip']}")
    model = create_model(cfg, 0).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(_images().cuda(), ["a dog", "a cat"])
    loss = info_nce(out["image_emb"].float(), out["text_emb"].float(), out["logit_scale"])
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.grad is not None
