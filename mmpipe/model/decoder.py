"""Captioning (``train.task=captioning``): a small transformer decoder over the image tokens.

    image encoder -> Encoded(pooled (B, Fi), tokens (B, N, Fi), mask (B, N))
                  -> memory = [pooled; tokens] projected to width (B, 1+N, W), key mask
    caption words -> [BOS] w1 .. wn [EOS] ids -> embed + positions -> causal self-attention
                  + cross-attention to the memory -> logits over the caption vocabulary

Teacher forcing: the input is ids[:-1], the target ids[1:]; PAD is ignored by the loss. The
vocabulary is built by train from the train captions (``build_vocabulary``), stored in the
checkpoint (``caption`` entry: words + max length) and rebuilt with the model; words are the
project's word tokenisation (``text.words``: lower-case letters and digits), unknown ones
``<unk>``. Decoding is greedy or beam search (length-normalised log-probability); neither
repeats a word trigram within a caption (``CaptionDecoder.no_repeat_ngram``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpipe.model.features import Encoded
from mmpipe.model.text import words

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


def build_vocabulary(captions: Iterable[str], max_words: int, max_len: int) -> dict[str, Any]:
    """The ``caption`` spec of a checkpoint: the ``max_words`` most frequent train words (ties
    alphabetical) after the specials, and the longest train caption in words, capped."""
    counts: Counter[str] = Counter()
    longest = 1
    for caption in captions:
        ws = words(caption)
        counts.update(ws)
        longest = max(longest, len(ws))
    ranked = sorted(counts, key=lambda w: (-counts[w], w))[:max_words]
    return {"vocab": [*SPECIALS, *ranked], "max_len": min(longest, max_len)}


class CaptionDecoder(nn.Module):
    """Pre-norm transformer decoder; output projection tied to the token embedding."""

    # decoding never repeats a word trigram of its own caption (Paulus et al. 2017): a small
    # decoder's likeliest continuation loops ("a red circle and a red circle ..."); 0 = off
    no_repeat_ngram = 3

    def __init__(self, spec: dict[str, Any], image_dim: int, width: int, layers: int,
                 dropout: float, pos_len: int):  # fmt: skip
        super().__init__()
        self.vocab: list[str] = list(spec["vocab"])
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = int(spec["max_len"])  # words; + BOS and EOS in the sequence
        heads = 4 if width % 4 == 0 else 1
        self.embed = nn.Embedding(len(self.vocab), width, padding_idx=PAD)
        # tied output: N(0, 1) rows would start the logits at ~sqrt(width) scale (a token loss of
        # ~60 at width 128 instead of ~log V); GPT-style small init keeps the first steps sane
        nn.init.normal_(self.embed.weight, std=width**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.pos = nn.Embedding(pos_len + 2, width)
        self.memory_proj = nn.Linear(image_dim, width)
        layer = nn.TransformerDecoderLayer(
            width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)

    def encode_captions(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """(B, L) ids [BOS] words [EOS] PAD..., words cut at ``max_len``."""
        rows = [[BOS, *(self.index.get(w, UNK) for w in words(t)[: self.max_len]), EOS]
                for t in texts]  # fmt: skip
        ids = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        return ids.to(device)

    def memory(self, image: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled vector and the tokens as the cross-attention memory (B, 1+N, W) + mask."""
        tokens = torch.cat([image.pooled[:, None], image.tokens], dim=1)
        valid = torch.ones_like(image.mask[:, :1])
        return self.memory_proj(tokens), torch.cat([valid, image.mask], dim=1)

    def logits(self, ids: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position: (B, T) ids -> (B, T, V)."""
        t = ids.shape[1]
        x = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).triu(1)  # True = hidden
        x = self.layers(x, memory, tgt_mask=causal, tgt_is_causal=True,
                        tgt_key_padding_mask=(ids == PAD), memory_key_padding_mask=~valid)  # fmt: skip
        return self.norm(x) @ self.embed.weight.T

    def teacher_forced(self, image: Encoded, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), target ids (B, T)) of the captions; PAD targets are ignored."""
        ids = self.encode_captions(texts, image.pooled.device)
        memory, valid = self.memory(image)
        return self.logits(ids[:, :-1], memory, valid), ids[:, 1:]

    def _next(self, seqs: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor,
              last: bool) -> torch.Tensor:  # fmt: skip
        """Log-probabilities of the next token (B, V); never PAD/BOS/UNK, only EOS at the cap."""
        logp = F.log_softmax(self.logits(seqs, memory, valid)[:, -1].float(), dim=-1)
        logp[:, [PAD, BOS, UNK]] = -torch.inf
        for row, tok in repeated_ngrams(seqs.tolist(), self.no_repeat_ngram):
            logp[row, tok] = -torch.inf
        if last:
            logp[:, :EOS] = -torch.inf
            logp[:, EOS + 1 :] = -torch.inf
        return logp

    @torch.no_grad()
    def greedy(self, image: Encoded) -> list[list[int]]:
        """The most likely next word at every step, until EOS or ``max_len`` words."""
        memory, valid = self.memory(image)
        seqs = torch.full((len(memory), 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(len(memory), dtype=torch.bool, device=memory.device)
        for step in range(self.max_len + 1):
            tok = self._next(seqs, memory, valid, step == self.max_len).argmax(dim=-1)
            tok = torch.where(done, PAD, tok)
            seqs, done = torch.cat([seqs, tok[:, None]], dim=1), done | (tok == EOS)
            if bool(done.all()):
                break
        return [_strip(row) for row in seqs.tolist()]

    @torch.no_grad()
    def beam(self, image: Encoded, size: int) -> list[list[int]]:
        """Beam search of ``size`` beams per image, batched; the finished hypothesis with the
        best log-probability per word (EOS counted) wins. ``size=1`` is greedy."""
        memory, valid = self.memory(image)
        b, k = len(memory), size
        memory, valid = memory.repeat_interleave(k, 0), valid.repeat_interleave(k, 0)
        seqs = torch.full((b * k, 1), BOS, dtype=torch.long, device=memory.device)
        score = torch.full((b, k), -torch.inf, device=memory.device)
        score[:, 0] = 0.0  # one live beam at the start, so the k first words differ
        done = torch.zeros(b * k, dtype=torch.bool, device=memory.device)
        length = torch.zeros(b * k, device=memory.device)
        for step in range(self.max_len + 1):
            logp = self._next(seqs, memory, valid, step == self.max_len)  # (bk, V)
            logp[done] = -torch.inf
            logp[done, PAD] = 0.0  # a finished beam carries on unchanged, as one candidate
            cand = (score.reshape(-1, 1) + logp).reshape(b, -1)  # (b, k*V)
            score, flat = cand.topk(k, dim=1)
            src = torch.arange(b, device=memory.device)[:, None] * k + flat // logp.shape[1]
            src, tok = src.reshape(-1), (flat % logp.shape[1]).reshape(-1)
            length = length[src] + (~done[src]).float()
            done = done[src] | (tok == EOS)
            seqs = torch.cat([seqs[src], tok[:, None]], dim=1)
            if bool(done.all()):
                break
        best = (score / length.reshape(b, k).clamp(min=1)).argmax(dim=1)
        rows = seqs.reshape(b, k, -1)[torch.arange(b), best]
        return [_strip(row) for row in rows.tolist()]

    def text(self, ids: list[int]) -> str:
        """Word ids (no specials) as a caption."""
        return " ".join(self.vocab[i] for i in ids)

    def generate(self, image: Encoded, beam: int = 1) -> list[str]:
        """One caption per image: greedy (beam 1) or beam search."""
        rows = self.greedy(image) if beam <= 1 else self.beam(image, beam)
        return [self.text(r) for r in rows]


def repeated_ngrams(rows: list[list[int]], n: int) -> list[tuple[int, int]]:
    """(row, token) pairs where ``token`` would repeat an ``n``-gram already in that row."""
    if n <= 0:
        return []
    out = []
    for r, row in enumerate(rows):
        prefix = tuple(row[len(row) - n + 1 :])
        out += [(r, row[i + n - 1]) for i in range(len(row) - n + 1)
                if tuple(row[i : i + n - 1]) == prefix]  # fmt: skip
    return out


def _strip(row: list[int]) -> list[int]:
    """The words of a generated row: after BOS, up to EOS."""
    out = []
    for i in row[1:]:
        if i in (EOS, PAD):
            break
        out.append(i)
    return out
