"""Image-text matching (ITM): does this caption belong to this image? A binary auxiliary task.

The ITM head reads the fused vector of a token-level fusion head (``fuse(ei, et) -> (B, H)``:
single_stream's [CLS], cross_attention's pooled sides). Each batch of B positive pairs gains
up to B negative pairs with a wrong caption and up to B with a wrong image, drawn from the same
batch with probability softmax(contrastive similarity) over the pairs of OTHER images: hard
negatives, as ALBEF (Li et al. 2021) and ViLT sample them. Pairs sharing an image are never
negatives of each other; a row whose batch holds no other image gets no negative.

Sampling draws from ``generator`` (evaluate: a seeded one, so the test negatives are the same
every run) or the global torch RNG (training: seeded and saved in checkpoints, so a resumed run
draws the same negatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmpipe.model.features import Encoded, concat_encoded


def sample_negatives(
    sim: torch.Tensor, groups: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``sim`` (B, B), a column of another group drawn by softmax(sim row):
    (column (B,) long, valid (B,) bool: the row had a column of another group)."""
    other = groups[:, None] != groups[None, :]  # (B, B)
    # + a floor so a confident model's softmax, underflowing to 0, still leaves a choice
    weights = (torch.softmax(sim.detach().float(), dim=1) + 1e-6) * other
    valid = other.any(dim=1)
    weights[~valid] = 1.0  # any column: the row is dropped below
    cols = torch.multinomial(weights.cpu(), 1, generator=generator)[:, 0].to(sim.device)
    return cols, valid


def itm_pairs(
    ei: Encoded,
    et: Encoded,
    sim: torch.Tensor,
    groups: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Encoded, Encoded, torch.Tensor]:
    """The batch's positives, then negatives with a sampled caption, then with a sampled image:
    (images, texts, labels (P,) float 1 = match). ``sim`` (B, B): image x text similarity."""
    neg_text, ok_text = sample_negatives(sim, groups, generator)
    neg_image, ok_image = sample_negatives(sim.T, groups, generator)
    rows_t, rows_i = ok_text.nonzero()[:, 0], ok_image.nonzero()[:, 0]
    images = concat_encoded([ei, ei.select(rows_t), ei.select(neg_image[rows_i])])
    texts = concat_encoded([et, et.select(neg_text[rows_t]), et.select(rows_i)])
    labels = torch.cat([torch.ones(len(ei.pooled)), torch.zeros(len(rows_t) + len(rows_i))])
    return images, texts, labels.to(ei.pooled.device)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of ITM logits (P,) against 1 = match / 0 = negative."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
