"""Fusion heads: pooled image features (B, Fi) + text features (B, Ft) -> task logits (B, K).

Every head first LayerNorms each modality (encoders differ wildly in scale: a scratch CNN vs
EfficientNet's 1280 ReLU6 features) and, where the operator needs one width, projects both to
``head_hidden`` (H). The same heads are trained on frozen features by the evaluation ablation
(``create_fusion_head``), so the model's own head and the ablation compare like with like.
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from mmpipe.config import ModelConfig

FUSION_MODES: tuple[str, ...] = get_args(ModelConfig.model_fields["fusion"].annotation)


def _mlp(din: int, hidden: int, dout: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(din, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dout)
    )


class FusionHead(nn.Module):
    """Base: per-modality LayerNorm + projection to H = ``hidden``; subclasses define ``fuse``.

    Every head takes (image width, text width, outputs K, hidden width H, dropout).
    """

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.norm_i, self.norm_t = nn.LayerNorm(di), nn.LayerNorm(dt)
        self.proj_i, self.proj_t = nn.Linear(di, hidden), nn.Linear(dt, hidden)
        self.classifier = _mlp(hidden, hidden, k, dropout)

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        zi = self.proj_i(self.norm_i(xi))  # (B, H)
        zt = self.proj_t(self.norm_t(xt))  # (B, H)
        return self.classifier(self.fuse(zi, zt))  # (B, H) -> (B, K)

    def fuse(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class SumFusion(FusionHead):
    """i + t."""

    def fuse(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        return zi + zt


class WeightedFusion(FusionHead):
    """alpha * i + (1 - alpha) * t; alpha fixed (``alpha``) or a learned sigmoid(a) if None."""

    def __init__(
        self, di: int, dt: int, k: int, hidden: int, dropout: float, alpha: float | None = None
    ):
        super().__init__(di, dt, k, hidden, dropout)
        self.fixed_alpha = alpha
        if alpha is None:
            self.alpha_logit = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5 to start

    @property
    def alpha(self) -> torch.Tensor:
        """The current mixing weight of the image branch."""
        if self.fixed_alpha is not None:
            return torch.tensor(self.fixed_alpha)
        return torch.sigmoid(self.alpha_logit)

    def fuse(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        a = self.alpha.to(zi.device, zi.dtype)
        return a * zi + (1 - a) * zt


class GatedFusion(FusionHead):
    """Per-dimension gate g = sigmoid(W [i; t]); g * i + (1 - g) * t (Arevalo et al. 2017)."""

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__(di, dt, k, hidden, dropout)
        self.gate = nn.Linear(2 * hidden, hidden)

    def fuse(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([zi, zt], dim=-1)))  # (B, H)
        return g * zi + (1 - g) * zt


class CrossAttentionFusion(FusionHead):
    """Two-way attention over the 2-token sequence [image; text] (+ modality embeddings).

    One pre-norm transformer block: each token attends to both, so the image token is rewritten
    in the light of the text and vice versa; the two outputs are averaged. Token-level
    (text tokens -> image patches) attention would need unpooled features, which the frozen-
    feature ablation does not have; this keeps one definition for both.
    """

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__(di, dt, k, hidden, dropout)
        h = hidden
        heads = 4 if h % 4 == 0 else 1
        self.modality = nn.Parameter(torch.zeros(2, h))
        nn.init.normal_(self.modality, std=0.02)
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.ffn = _mlp(h, 2 * h, h, dropout)

    def fuse(self, zi: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
        x = torch.stack([zi, zt], dim=1) + self.modality  # (B, 2, H)
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]  # (B, 2, H)
        x = x + self.ffn(self.norm2(x))  # (B, 2, H)
        return x.mean(dim=1)  # (B, H)


class ConcatFusion(nn.Module):
    """MLP on [i; t] (early fusion)."""

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.norm_i, self.norm_t = nn.LayerNorm(di), nn.LayerNorm(dt)
        self.classifier = _mlp(di + dt, hidden, k, dropout)

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.norm_i(xi), self.norm_t(xt)], dim=-1)  # (B, Fi + Ft)
        return self.classifier(x)  # (B, K)


class LateFusion(nn.Module):
    """Average of separate image and text classifiers' logits (no feature interaction)."""

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.image = nn.Sequential(nn.LayerNorm(di), _mlp(di, hidden, k, dropout))
        self.text = nn.Sequential(nn.LayerNorm(dt), _mlp(dt, hidden, k, dropout))

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.image(xi) + self.text(xt))  # (B, K)


class UnimodalHead(nn.Module):
    """Classifier on one modality only (the ablation baselines)."""

    def __init__(self, dim: int, k: int, hidden: int, dropout: float, use_image: bool):
        super().__init__()
        self.use_image = use_image
        self.classifier = nn.Sequential(nn.LayerNorm(dim), _mlp(dim, hidden, k, dropout))

    def forward(self, xi: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        return self.classifier(xi if self.use_image else xt)  # (B, K)


def create_fusion_head(
    mode: str,
    image_dim: int,
    text_dim: int,
    num_outputs: int,
    *,
    hidden: int,
    dropout: float,
    alpha: float | None = None,
) -> nn.Module:
    """A head ``(xi (B, image_dim), xt (B, text_dim)) -> logits (B, num_outputs)`` for ``mode``.

    ``hidden`` and ``dropout`` size every head's MLP; ``alpha`` only fixes `weighted`'s mix.
    """
    if mode == "image_only":
        return UnimodalHead(image_dim, num_outputs, hidden, dropout, use_image=True)
    if mode == "text_only":
        return UnimodalHead(text_dim, num_outputs, hidden, dropout, use_image=False)
    if mode == "weighted":
        return WeightedFusion(image_dim, text_dim, num_outputs, hidden, dropout, alpha)
    heads = {
        "concat": ConcatFusion,
        "sum": SumFusion,
        "gated": GatedFusion,
        "cross_attention": CrossAttentionFusion,
        "late": LateFusion,
    }
    if mode not in heads:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {', '.join(FUSION_MODES)}")
    return heads[mode](image_dim, text_dim, num_outputs, hidden, dropout)
