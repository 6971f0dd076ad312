"""Audio encoder: a (B, 1, N_MELS, FRAMES) log-mel spectrogram -> pooled features (B, F).

A small CNN over the log-mel picture (the shape of audio classifiers such as PANNs' CNN6, much
narrower). Each clip is standardised on its own first (log-mel levels depend on the recording
gain, which says nothing about the content), and GroupNorm keeps samples independent of their
batch, like the image CNN (exact resume, DDP equivalence). Time is pooled away at the end;
frequency keeps a coarse axis, since pitch (a chord's third, a voice) is the content.
"""

from __future__ import annotations

import torch
from torch import nn

from mmpipe.config import ModelConfig
from mmpipe.model.image import _conv

FREQ_BINS = 8  # frequency rows kept by the pool


class AudioCNN(nn.Module):
    """Four conv stages: stride 2 in frequency and time, then time only; pool; project."""

    def __init__(self, width: int):
        super().__init__()
        self.out_dim = width
        channels = [1, max(width // 4, 8), max(width // 2, 8), width, width]
        # (B, 1, M, T) -> (B, c1, M/2, T/2) -> (B, c2, M/4, T/4) -> (B, w, M/4, T/8) -> T/16
        stages = [_conv(a, b, 2) if i < 2 else _time_conv(a, b)
                  for i, (a, b) in enumerate(zip(channels, channels[1:], strict=False))]  # fmt: skip
        self.body = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d((FREQ_BINS, 1))
        self.proj = nn.Linear(FREQ_BINS * width, width)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        mean = spec.mean(dim=(2, 3), keepdim=True)
        std = spec.std(dim=(2, 3), keepdim=True)
        x = self.body((spec - mean) / (std + 1e-5))
        return self.proj(self.pool(x).flatten(1))  # (B, 1, M, T) -> (B, F)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the conv stages, then the projection."""
        return [*self.body, self.proj]


def _time_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, (1, 2), 1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


def create_audio_encoder(cfg: ModelConfig) -> AudioCNN | None:
    """The configured audio encoder, or None (``audio_encoder: none``: image + text only)."""
    if cfg.audio_encoder == "none":
        return None
    return AudioCNN(cfg.width)
