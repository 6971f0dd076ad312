"""Hugging Face models as mmpipe encoders, loaded by hub id or local directory, never downloaded
unless the user allows it.

Three ways in (``ModelConfig``):

- ``pretrained: hf:<id-or-dir>``: a whole dual encoder (``CLIPModel``, ``SiglipModel``) with its
  own projections and temperature (and SigLIP's bias): usable with zero training steps;
- ``image_encoder: hf:<id-or-dir>``: any AutoModel vision backbone (a CLIP/SigLIP vision tower,
  ViT, ...) under a new projection;
- ``text_encoder: hf:<id-or-dir>``: any AutoModel text backbone + its tokenizer (BERT, a CLIP/SigLIP
  text tower, ...) under a new projection.

A model's preprocessing comes from its own files: the image processor's size, mean and std, the
tokenizer and its max length (``Preprocessing``). A ``HFSpec`` holds what rebuilds the model
without its directory (the architecture config, the tokenizer's files, the preprocessing): it goes
into every checkpoint (``meta["hf"]``), so a checkpoint alone rebuilds the model and a served
model never reads a path it was not given.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpipe.errors import InputError
from mmpipe.model.features import Encoded

log = logging.getLogger(__name__)

PREFIX = "hf:"
# what `pretrained:` accepts: dual encoders that ship projections and a temperature
DUAL_TYPES = ("clip", "siglip", "siglip2")


def is_hf(name: str | None) -> bool:
    """Whether an encoder/pretrained name is a Hugging Face model (``hf:<id-or-dir>``)."""
    return bool(name) and str(name).startswith(PREFIX)


def hf_source(name: str) -> str:
    """The hub id or directory of ``hf:<id-or-dir>``."""
    source = name[len(PREFIX) :].strip()
    if not source:
        raise InputError(f"{name!r}: give a hub id or a local directory after 'hf:'")
    return source


@dataclass
class Preprocessing:
    """What the model expects of its inputs, from its own processor and tokenizer files."""

    image_size: int | None  # square side the vision tower takes (None: a text-only spec)
    mean: list[float]
    std: list[float]
    processor: str  # the image processor class that was read (torchvision or PIL backend)
    max_length: int
    padding: str  # "longest" or "max_length" (SigLIP's text tower pools the last position)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class HFSpec:
    """What rebuilds a Hugging Face model without its directory (stored in checkpoints)."""

    source: str  # the hub id or directory it was first loaded from (for reports only)
    role: str  # "dual", "vision" or "text"
    config: dict[str, Any]  # the architecture config (config.to_dict())
    tokenizer_files: dict[str, bytes]  # the tokenizer's saved files ({} for a vision tower)
    preprocessing: Preprocessing

    def as_dict(self) -> dict[str, Any]:
        """Plain types only: loadable with ``torch.load(weights_only=True)``."""
        return {
            "source": self.source,
            "role": self.role,
            "config": self.config,
            "tokenizer_files": dict(self.tokenizer_files),
            "preprocessing": self.preprocessing.as_dict(),
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> HFSpec:
        return HFSpec(
            d["source"], d["role"], d["config"], dict(d["tokenizer_files"]),
            Preprocessing(**d["preprocessing"]),
        )  # fmt: skip


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute transformers' load reports (unused pooler weights, processor backend notices)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _local_only(allow_download: bool) -> bool:
    return not allow_download or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def _not_cached(source: str, exc: Exception) -> InputError:
    return InputError(
        f"hf:{source}: not a local directory and not in the local Hugging Face cache "
        f"({type(exc).__name__}); fetch it once with `hf download {source}` (or "
        f"`huggingface-cli download {source}`) on a machine with access, or give its directory "
        "as hf:/path/to/model; set train.allow_download=true (and unset HF_HUB_OFFLINE) to let "
        "mmpipe download it"
    )


def _from_pretrained(loader: Any, source: str, allow_download: bool, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source)`` offline unless allowed; one clear error if missing."""
    if Path(source).exists() and not Path(source).is_dir():
        raise InputError(f"hf:{source}: not a model directory")
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().is_dir():
        raise InputError(f"hf:{source}: model directory not found")
    local = Path(source).is_dir()
    try:
        with _quiet():
            return loader.from_pretrained(
                source, local_files_only=local or _local_only(allow_download), **kwargs
            )
    except OSError as exc:  # hub client errors are OSError subclasses (offline, not found)
        if local:
            raise InputError(f"hf:{source}: cannot load it ({exc})") from None
        raise _not_cached(source, exc) from None


def _square(size: Any) -> int | None:
    """An image processor's ``size``/``crop_size`` as one side (int), or None."""
    if size is None:
        return None
    if isinstance(size, int):
        return size
    d = dict(size)
    for key in ("height", "shortest_edge", "width"):
        if d.get(key):
            return int(d[key])
    return None


def read_preprocessing(source: str, allow_download: bool, config: Any) -> Preprocessing:
    """Image size/mean/std from the image processor, max length/padding from the tokenizer."""
    from transformers import AutoImageProcessor

    vision = getattr(config, "vision_config", None) or config
    size, mean, std, name = getattr(vision, "image_size", None), [0.5] * 3, [0.5] * 3, "none"
    with contextlib.suppress(InputError, ValueError, KeyError):
        proc = _from_pretrained(AutoImageProcessor, source, allow_download)
        crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
        size = _square(crop) or _square(getattr(proc, "size", None)) or size
        mean, std = list(proc.image_mean), list(proc.image_std)
        name = type(proc).__name__
    text = getattr(config, "text_config", None) or config
    max_length = int(getattr(text, "max_position_embeddings", 512) or 512)
    siglip = config.model_type.startswith("siglip")
    return Preprocessing(
        image_size=int(size) if size else None, mean=[float(x) for x in mean],
        std=[float(x) for x in std], processor=name, max_length=max_length,
        padding="max_length" if siglip else "longest",
    )  # fmt: skip


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as its saved files (bytes), to store in a checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def load_tokenizer(files: dict[str, bytes]) -> Any:
    """A tokenizer rebuilt from ``_tokenizer_files``' output (no hub, no original directory)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        with _quiet():
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def load_pretrained(name: str, role: str, allow_download: bool = False) -> tuple[nn.Module, HFSpec]:
    """The model ``hf:<id-or-dir>`` with its weights, and the spec that rebuilds it.

    ``role``: "dual" (a CLIP/SigLIP whole), "vision" or "text" (one backbone; the tower of a
    dual model is taken)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    source = hf_source(name)
    config = _from_pretrained(AutoConfig, source, allow_download)
    if role == "dual" and config.model_type not in DUAL_TYPES:
        raise InputError(
            f"train.pretrained={name}: a {config.model_type!r} model is not a dual encoder with "
            f"its own projections ({', '.join(DUAL_TYPES)}); use train.image_encoder / "
            "train.text_encoder: hf:... for separate backbones"
        )
    model = _from_pretrained(AutoModel, source, allow_download)
    pre = read_preprocessing(source, allow_download, config)
    files: dict[str, bytes] = {}
    if role in ("dual", "text"):
        files = _tokenizer_files(_from_pretrained(AutoTokenizer, source, allow_download))
    spec = HFSpec(source, role, config.to_dict(), files, pre)
    return _tower(model, role), spec


def build_from_spec(spec: HFSpec) -> nn.Module:
    """The model of ``spec`` with fresh weights (a checkpoint's state dict fills them in)."""
    from transformers import AutoConfig, AutoModel

    config = dict(spec.config)
    kind = config.pop("model_type")
    with _quiet():
        model = AutoModel.from_config(AutoConfig.for_model(kind, **config))
    return _tower(model, spec.role)


def _tower(model: nn.Module, role: str) -> nn.Module:
    """The vision or text tower of a dual model; the model itself otherwise."""
    if role == "vision" and hasattr(model, "vision_model"):
        return model.vision_model
    if role == "text" and hasattr(model, "text_model"):
        return model.text_model
    return model


# ----------------------------------------------------------------------------- encoders


def _layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers of a HF backbone, input to output."""
    encoder = getattr(model, "encoder", None)
    for attr in ("layers", "layer"):
        layers = getattr(encoder, attr, None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def _groups(model: nn.Module) -> list[nn.Module]:
    """``layer_groups`` of a HF backbone: embeddings, each layer, the final norm/head."""
    first = [m for n in ("embeddings", "pre_layrnorm") if (m := getattr(model, n, None))]
    last = [
        m
        for n in ("post_layernorm", "final_layer_norm", "layernorm", "pooler", "head")
        if isinstance(m := getattr(model, n, None), nn.Module)
    ]
    return [nn.ModuleList(first), *_layers(model), nn.ModuleList(last)]


def _hidden_size(config: Any) -> int:
    return int(getattr(config, "hidden_size", None) or config.hidden_sizes[-1])


class HFVisionEncoder(nn.Module):
    """A HF vision backbone on mmpipe's images.

    mmpipe's loader gives (B, 3, H, W) in [-1, 1]; the tower gets ``(x01 - mean) / std`` with
    its own processor's mean and std. Pooled: the backbone's pooler output (CLIP: the
    post-layernormed class token; SigLIP: its attention-pooling head), else the tokens' mean.
    """

    def __init__(self, model: nn.Module, pre: Preprocessing):
        super().__init__()
        self.model, self.pre = model, pre
        self.out_dim = _hidden_size(model.config)
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (mmpipe's loader) -> the processor's normalisation."""
        return ((images + 1.0) * 0.5 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images).pooled

    def encode(self, images: torch.Tensor) -> Encoded:
        """Pooled (B, F) and the patch tokens (B, N, F)."""
        out = self.model(pixel_values=self.normalise(images))
        tokens = out.last_hidden_state
        if tokens.dim() == 4:  # conv backbones: (B, C, h, w)
            tokens = tokens.flatten(2).transpose(1, 2)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = tokens.mean(dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return Encoded(pooled.flatten(1), tokens, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: embeddings, each layer, the final norm and head."""
        return _groups(self.model)


class HFTextEncoder(nn.Module):
    """A HF text backbone and its tokenizer.

    Pooled: the backbone's own pooled output for CLIP/SigLIP text towers (the EOS / last token,
    as they were trained), else the masked mean of the tokens (sentence-transformers' pooling).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, pre: Preprocessing, max_tokens: int):
        super().__init__()
        self.model, self.tokenizer, self.pre = model, tokenizer, pre
        self.out_dim = _hidden_size(model.config)
        limit = min(pre.max_length, int(getattr(tokenizer, "model_max_length", 10**6)))
        # SigLIP pads to its training length: its text tower pools the last position
        self.max_length = limit if pre.padding == "max_length" else min(max_tokens, limit)
        self.own_pool = model.config.model_type.startswith(("clip", "siglip"))

    def forward(self, texts: list[str]) -> torch.Tensor:
        return self.encode(texts).pooled

    def encode(self, texts: list[str]) -> Encoded:
        """Pooled (B, F) and the tokens (B, T, F) with their attention mask."""
        batch = self.tokenizer(
            list(texts), padding=self.pre.padding, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        )  # fmt: skip
        device = next(self.model.parameters()).device
        kwargs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        if self.model.config.model_type.startswith("siglip"):
            kwargs.pop("attention_mask", None)  # SigLIP was trained without one (its pads count)
        out = self.model(**kwargs)
        x = out.last_hidden_state  # (B, T, F)
        mask = batch["attention_mask"].to(device).bool()
        if self.own_pool and getattr(out, "pooler_output", None) is not None:
            return Encoded(out.pooler_output, x, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        return Encoded((x * m).sum(1) / m.sum(1).clamp(min=1.0), x, mask)

    def layer_groups(self) -> list[nn.Module]:
        """Input to output: embeddings, each layer, the final norm and head."""
        return _groups(self.model)


def set_gradient_checkpointing(encoder: nn.Module) -> bool:
    """Turn on activation checkpointing of a HF backbone (or MiniLM); whether it could."""
    model = getattr(encoder, "model", None) or getattr(encoder, "bert", None)
    if model is None or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return True


# ----------------------------------------------------------------------------- the parts


@dataclass
class HFParts:
    """What ``MultimodalModel`` takes from Hugging Face: encoders, and for a whole dual encoder
    its projections, logit scale and bias; ``specs`` rebuild them (checkpoint ``meta["hf"]``)."""

    image_encoder: nn.Module | None = None
    text_encoder: nn.Module | None = None
    image_proj: nn.Module | None = None
    text_proj: nn.Module | None = None
    logit_scale: float | None = None
    logit_bias: float | None = None
    embed_dim: int | None = None
    specs: dict[str, dict[str, Any]] | None = None


def _dual_parts(model: nn.Module, spec: HFSpec, max_tokens: int) -> HFParts:
    tokenizer = load_tokenizer(spec.tokenizer_files)
    siglip = model.config.model_type.startswith("siglip")
    bias = getattr(model, "logit_bias", None)
    return HFParts(
        image_encoder=HFVisionEncoder(model.vision_model, spec.preprocessing),
        text_encoder=HFTextEncoder(model.text_model, tokenizer, spec.preprocessing, max_tokens),
        image_proj=nn.Identity() if siglip else model.visual_projection,
        text_proj=nn.Identity() if siglip else model.text_projection,
        logit_scale=float(model.logit_scale.detach().reshape(-1)[0]),
        logit_bias=None if bias is None else float(bias.detach().reshape(-1)[0]),
        embed_dim=int(getattr(model.config, "projection_dim", 0) or 0)
        or _hidden_size(model.vision_model.config),
    )


def create_hf_parts(
    cfg: Any, specs: dict[str, dict[str, Any]] | None = None, allow_download: bool = False
) -> HFParts:
    """The Hugging Face parts ``cfg`` (a ModelConfig) names, with pretrained weights; or, with
    ``specs`` (a checkpoint's ``meta["hf"]``), rebuilt from them with fresh weights and no
    file read. Parts ``cfg`` does not name are None."""
    wanted = {"dual": cfg.pretrained, "vision": cfg.image_encoder, "text": cfg.text_encoder}
    wanted = {role: name for role, name in wanted.items() if is_hf(name)}
    if not wanted:
        return HFParts()
    parts, out_specs = HFParts(), {}
    for role, name in wanted.items():
        if specs is not None:
            if role not in specs:
                raise InputError(f"checkpoint lacks the Hugging Face spec of {name}")
            spec = HFSpec.from_dict(specs[role])
            model = build_from_spec(spec)
        else:
            model, spec = load_pretrained(name, role, allow_download)
        out_specs[role] = spec.as_dict()
        if role == "dual":
            parts = _dual_parts(model, spec, cfg.max_tokens)  # a new HFParts, specs set below
        elif role == "vision":
            parts.image_encoder = HFVisionEncoder(model, spec.preprocessing)
        else:
            tokenizer = load_tokenizer(spec.tokenizer_files)
            parts.text_encoder = HFTextEncoder(model, tokenizer, spec.preprocessing, cfg.max_tokens)
    parts.specs = out_specs
    return parts


def expected_image_size(specs: dict[str, dict[str, Any]] | None) -> tuple[str, int] | None:
    """(model source, side in px) the vision tower of ``specs`` takes, or None."""
    for role in ("dual", "vision"):
        spec = (specs or {}).get(role)
        if spec and spec["preprocessing"].get("image_size"):
            return spec["source"], int(spec["preprocessing"]["image_size"])
    return None
