"""Fusion heads: pooled image features (B, Fi) + text features (B, Ft) -> task logits (B, K).

The token-level heads (``TOKEN_LEVEL``: ``cross_attention``, ``single_stream``) read the
encoders' unpooled tokens instead: ``features.Encoded`` of each modality, with masks;
``apply_head`` gives any head what it reads.

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
from mmpipe.model.features import Encoded
from mmpipe.model.text import masked_mean

FUSION_MODES: tuple[str, ...] = get_args(ModelConfig.model_fields["fusion"].annotation)
TOKEN_LEVEL = frozenset({"cross_attention", "single_stream"})
MAX_POSITIONS = 256  # learned positions per modality: a 256-patch grid or 256 words at most


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
    """``cross_attention_pooled``: two-way attention over the 2-token sequence [image; text].

    One pre-norm transformer block (+ modality embeddings): each pooled vector attends to both,
    so the image token is rewritten in the light of the text and vice versa; the two outputs are
    averaged. Kept for the ablation beside the token-level ``TokenCrossAttentionFusion``.
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


def _heads(h: int) -> int:
    return 4 if h % 4 == 0 else 1


def _positions(h: int) -> nn.Parameter:
    table = nn.Parameter(torch.zeros(MAX_POSITIONS, h))
    nn.init.normal_(table, std=0.02)
    return table


def _add_positions(x: torch.Tensor, table: nn.Parameter, what: str) -> torch.Tensor:
    """x (B, N, H) + the first N rows of a learned position table."""
    if x.shape[1] > MAX_POSITIONS:
        raise ValueError(
            f"{x.shape[1]} {what} tokens exceed the fusion head's {MAX_POSITIONS} positions "
            "(use smaller images, a larger patch_size or fewer max_tokens)"
        )
    return x + table[: x.shape[1]]


class TokenHead(nn.Module):
    """Base of the token-level heads: per-modality LayerNorm + projection of every token to H,
    learned modality and position embeddings, an MLP classifier on the fused (B, H) vector."""

    token_level = True

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.norm_i, self.norm_t = nn.LayerNorm(di), nn.LayerNorm(dt)
        self.proj_i, self.proj_t = nn.Linear(di, hidden), nn.Linear(dt, hidden)
        self.modality = nn.Parameter(torch.zeros(2, hidden))
        nn.init.normal_(self.modality, std=0.02)
        self.pos_i, self.pos_t = _positions(hidden), _positions(hidden)
        self.classifier = _mlp(hidden, hidden, k, dropout)

    def embed(self, ei: Encoded, et: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, Ni, H) and text tokens (B, Nt, H), with modality and positions."""
        ti = self.proj_i(self.norm_i(ei.tokens)) + self.modality[0]
        tt = self.proj_t(self.norm_t(et.tokens)) + self.modality[1]
        return _add_positions(ti, self.pos_i, "image"), _add_positions(tt, self.pos_t, "text")

    def forward(self, ei: Encoded, et: Encoded) -> torch.Tensor:
        return self.classifier(self.fuse(ei, et))  # (B, H) -> (B, K)

    def fuse(self, ei: Encoded, et: Encoded) -> torch.Tensor:
        raise NotImplementedError


class CrossBlock(nn.Module):
    """Pre-norm block: queries attend to the other modality's tokens, then a feed-forward.

    A row whose keys are all masked (a sample missing that modality) gets no update from the
    attention instead of NaN.
    """

    def __init__(self, h: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ffn = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        self.attn = nn.MultiheadAttention(h, _heads(h), dropout=dropout, batch_first=True)
        self.ffn = _mlp(h, 2 * h, h, dropout)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, H) attends to kv (B, Nk, H) where kv_mask (B, Nk) -> (B, Nq, H)."""
        present = kv_mask.any(dim=1)  # (B,)
        ignore = ~kv_mask & present[:, None]  # an empty row attends to padding, then is zeroed
        k = self.norm_kv(kv)
        out = self.attn(self.norm_q(q), k, k, key_padding_mask=ignore, need_weights=False)[0]
        q = q + out * present[:, None, None].to(out.dtype)
        return q + self.ffn(self.norm_ffn(q))


class TokenCrossAttentionFusion(TokenHead):
    """``cross_attention``: text tokens attend to image patches and image patches to text tokens
    (one cross-attention block each way, from the same inputs); the fused vector is the mean of
    the two sides' masked token means. Unlike the pooled variant, a word can pick the patch it
    talks about ("on the left")."""

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float):
        super().__init__(di, dt, k, hidden, dropout)
        self.text_to_image = CrossBlock(hidden, dropout)
        self.image_to_text = CrossBlock(hidden, dropout)

    def fuse(self, ei: Encoded, et: Encoded) -> torch.Tensor:
        ti, tt = self.embed(ei, et)  # (B, Ni, H), (B, Nt, H)
        t2 = self.text_to_image(tt, ti, ei.mask)  # (B, Nt, H)
        i2 = self.image_to_text(ti, tt, et.mask)  # (B, Ni, H)
        return 0.5 * (masked_mean(t2, et.mask) + masked_mean(i2, ei.mask))  # (B, H)


class SingleStreamFusion(TokenHead):
    """``single_stream`` (ViLT, Kim et al. 2021): [CLS] + word tokens + image patches, with
    modality and position embeddings, in one pre-norm transformer; the [CLS] output is fused.

    With ``image_encoder=patch`` and ``text_encoder=embedding`` this is ViLT's whole model
    (linear patch and word embeddings, all depth here); over the default encoders' tokens it is
    a single-stream fusion transformer, which the frozen-feature ablation can train.
    """

    def __init__(self, di: int, dt: int, k: int, hidden: int, dropout: float, layers: int = 2):
        super().__init__(di, dt, k, hidden, dropout)
        self.cls = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(
            hidden, _heads(hidden), 2 * hidden, dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        # nested tensors would change numerics between train and eval; keep one code path
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)

    def fuse(self, ei: Encoded, et: Encoded) -> torch.Tensor:
        ti, tt = self.embed(ei, et)  # (B, Ni, H), (B, Nt, H)
        cls = self.cls.expand(len(ti), -1, -1)  # (B, 1, H)
        x = torch.cat([cls, tt, ti], dim=1)  # (B, 1 + Nt + Ni, H)
        valid = torch.ones_like(et.mask[:, :1])
        mask = torch.cat([valid, et.mask, ei.mask], dim=1)  # [CLS] is always valid: no NaN rows
        return self.norm(self.layers(x, src_key_padding_mask=~mask)[:, 0])  # (B, H)


def apply_head(head: nn.Module, ei: Encoded, et: Encoded) -> torch.Tensor:
    """Logits of any fusion head: token-level heads get the tokens, the others the pooled."""
    if getattr(head, "token_level", False):
        return head(ei, et)
    return head(ei.pooled, et.pooled)


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


class AudioLateFusion(nn.Module):
    """An image-text head (or none: ``audio_only``) + an audio classifier on the clip's pooled
    features, its logits added where a clip is present: the model's own tri-modal late fusion,
    for the ablation. ``ea``: the audio ``Encoded`` with ``mask`` (B, 1) = has a clip."""

    def __init__(self, base: nn.Module | None, da: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.base = base
        self.audio = nn.Sequential(nn.LayerNorm(da), _mlp(da, hidden, k, dropout))

    def forward(self, ei: Encoded, et: Encoded, ea: Encoded) -> torch.Tensor:
        audio = self.audio(ea.pooled) * ea.mask[:, :1].to(ea.pooled.dtype)  # (B, K); 0: no clip
        return audio if self.base is None else apply_head(self.base, ei, et) + audio


class AudioConcatFusion(nn.Module):
    """``concat+audio`` (ablation): one MLP on [image; text; clip], the clip's part zero where
    a sample has none (``ea.mask`` (B, 1)); ``concat`` with the third modality beside."""

    def __init__(self, di: int, dt: int, da: int, k: int, hidden: int, dropout: float):
        super().__init__()
        self.norm_i, self.norm_t, self.norm_a = nn.LayerNorm(di), nn.LayerNorm(dt), nn.LayerNorm(da)
        self.classifier = _mlp(di + dt + da, hidden, k, dropout)

    def forward(self, ei: Encoded, et: Encoded, ea: Encoded) -> torch.Tensor:
        xa = self.norm_a(ea.pooled) * ea.mask[:, :1].to(ea.pooled.dtype)  # (B, Fa); 0: no clip
        x = torch.cat([self.norm_i(ei.pooled), self.norm_t(et.pooled), xa], dim=-1)
        return self.classifier(x)  # (B, K)


def create_fusion_head(
    mode: str,
    image_dim: int,
    text_dim: int,
    num_outputs: int,
    *,
    hidden: int,
    dropout: float,
    alpha: float | None = None,
    layers: int = 2,
) -> nn.Module:
    """A head ``(xi (B, image_dim), xt (B, text_dim)) -> logits (B, num_outputs)`` for ``mode``
    (the ``TOKEN_LEVEL`` modes take ``Encoded`` inputs instead: call it via ``apply_head``).

    ``hidden`` and ``dropout`` size every head's MLP; ``alpha`` only fixes `weighted`'s mix;
    ``layers`` is `single_stream`'s depth.
    """
    if mode == "image_only":
        return UnimodalHead(image_dim, num_outputs, hidden, dropout, use_image=True)
    if mode == "text_only":
        return UnimodalHead(text_dim, num_outputs, hidden, dropout, use_image=False)
    if mode == "weighted":
        return WeightedFusion(image_dim, text_dim, num_outputs, hidden, dropout, alpha)
    if mode == "single_stream":
        return SingleStreamFusion(image_dim, text_dim, num_outputs, hidden, dropout, layers)
    heads = {
        "concat": ConcatFusion,
        "sum": SumFusion,
        "gated": GatedFusion,
        "cross_attention": TokenCrossAttentionFusion,
        "cross_attention_pooled": CrossAttentionFusion,
        "late": LateFusion,
    }
    if mode not in heads:
        raise ValueError(f"unknown fusion mode {mode!r}; expected one of {', '.join(FUSION_MODES)}")
    return heads[mode](image_dim, text_dim, num_outputs, hidden, dropout)
