"""What an encoder returns: the pooled vector and the unpooled tokens it was pooled from.

Every encoder (image, text, and any later modality) is a ``TokenEncoder``: ``encode(x) ->
Encoded``, and calling it gives the pooled vector, so the contrastive projections and the pooled fusion heads
read what they always did. Token-level heads (``fusion.TOKEN_LEVEL``) read ``tokens`` and
``mask``: a padded text position, a missing clip or a masked patch is ``False`` in ``mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Encoded:
    """One modality of a batch: pooled (B, F), tokens (B, N, F), mask (B, N) bool (True = valid)."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor

    def select(self, rows: torch.Tensor) -> Encoded:
        """The rows ``rows`` (an index or a bool mask over B) of all three."""
        return Encoded(self.pooled[rows], self.tokens[rows], self.mask[rows])

    def to_cpu(self) -> Encoded:
        """A float32 CPU copy (what the frozen-feature ablation keeps)."""
        return Encoded(self.pooled.float().cpu(), self.tokens.float().cpu(), self.mask.cpu())

    def pooled_only(self) -> Encoded:
        """A float32 CPU copy of the pooled vector with zero tokens (B, 0, F) kept."""
        return Encoded(self.pooled.float().cpu(), self.tokens[:, :0].float().cpu(),
                       self.mask[:, :0].cpu())  # fmt: skip


class TokenEncoder(nn.Module):
    """Base of every encoder: ``encode(x) -> Encoded``; calling it gives the pooled (B, F)."""

    out_dim: int

    def forward(self, x: Any) -> torch.Tensor:
        return self.encode(x).pooled

    def encode(self, x: Any) -> Encoded:
        raise NotImplementedError


def grid_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature map (B, C, h, w) as tokens (B, h*w, C), row-major, and an all-valid mask."""
    tokens = x.flatten(2).transpose(1, 2)
    return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=x.device)


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """Batches of one modality into one: tokens right-padded to the longest (mask False)."""
    n = max(p.tokens.shape[1] for p in parts)
    tokens, masks = [], []
    for p in parts:
        pad = n - p.tokens.shape[1]
        tokens.append(torch.nn.functional.pad(p.tokens, (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(p.mask, (0, pad), value=False))
    return Encoded(torch.cat([p.pooled for p in parts]), torch.cat(tokens), torch.cat(masks))


@dataclass
class CachedFeatures:
    """A batch's features from the frozen-feature cache (``mmpipe.featurecache``), in place of
    its pixels (or, for a locked text tower, its texts): the locked part is not run again.

    ``start`` is how many of the encoder's ``layer_groups()`` produced ``x``: all of them (a
    locked tower: ``x`` is the pooled (B, F) and ``tokens`` the (B, N, F) grid, or None when no
    head reads tokens), or fewer (the locked prefix of a tower whose last groups train: ``x``
    is the activation the first trainable group takes, and the encoder's ``encode_from`` runs
    the rest).
    """

    start: int
    whole: bool
    x: torch.Tensor
    tokens: torch.Tensor | None = None

    def encoded(self, encoder: nn.Module) -> Encoded:
        """The encoder's output for these features."""
        if not self.whole:
            return encoder.encode_from(self.x, self.start)
        tokens = self.tokens
        if tokens is None:  # pooled-only cache: no head reads the tokens
            tokens = self.x.new_zeros(len(self.x), 0, self.x.shape[-1])
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(self.x, tokens, mask)
