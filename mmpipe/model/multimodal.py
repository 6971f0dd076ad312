"""Dual encoder (CLIP-style) + fusion classifier, and the multitask loss.

    images (B, 3, H, W) -> image encoder -> xi (B, Fi) -> proj -> L2 norm -> image_emb (B, D)
    texts  list[str]    -> text encoder  -> xt (B, Ft) -> proj -> L2 norm -> text_emb  (B, D)
    (xi, xt) -> fusion head -> logits (B, K)
    token-level heads (cross_attention, single_stream): the encoders' tokens + masks -> logits

The fusion head reads the pooled encoder features, not the contrastive embeddings: InfoNCE only
keeps what the two modalities share (shapes, colours, positions), while the task may need what
they do not share (e.g. the caption's sentiment vs the image's palette).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmpipe.config import ModelConfig
from mmpipe.model.audio import create_audio_encoder
from mmpipe.model.decoder import PAD, CaptionDecoder
from mmpipe.model.features import Encoded
from mmpipe.model.fusion import apply_head, create_fusion_head
from mmpipe.model.hf import create_hf_parts
from mmpipe.model.image import create_image_encoder
from mmpipe.model.itm import itm_pairs
from mmpipe.model.text import create_text_encoder
from mmpipe.taskspec import task_spec

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100
SIGLIP_INIT_BIAS = -10.0  # SigLIP (Zhai et al. 2023): b = -10 keeps the many negatives quiet


def num_outputs(task: str, num_classes: int) -> int:
    """Logits per sample: one for binary and regression, one per class (answer) otherwise."""
    return task_spec(task).outputs(num_classes)


class MultimodalModel(nn.Module):
    """Image + text encoders, projections into a shared space, a learnable temperature, a head."""

    def __init__(
        self,
        cfg: ModelConfig,
        num_classes: int,
        caption: dict[str, Any] | None = None,
        hf: dict[str, Any] | None = None,
        allow_download: bool = False,
    ):
        super().__init__()
        self.task, self.num_classes = cfg.task, num_classes
        # Hugging Face parts: pretrained weights when training, or rebuilt from a checkpoint's
        # specs (``hf``, no file read); none for the built-in encoders (no RNG draw either)
        parts = create_hf_parts(cfg, hf, allow_download)
        self.hf_specs = parts.specs or {}
        self.image_encoder = parts.image_encoder or create_image_encoder(cfg)
        self.text_encoder = parts.text_encoder or create_text_encoder(cfg)
        di, dt = self.image_encoder.out_dim, self.text_encoder.out_dim
        k = num_outputs(cfg.task, num_classes)
        self.embed_dim = parts.embed_dim or cfg.embed_dim  # a pretrained dual encoder's own
        self.image_proj = parts.image_proj or nn.Linear(di, self.embed_dim, bias=False)
        self.text_proj = parts.text_proj or nn.Linear(dt, self.embed_dim, bias=False)
        scale = parts.logit_scale
        if scale is None:
            scale = math.log(1.0 / cfg.init_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(float(scale)))
        self.contrastive_loss = cfg.contrastive_loss
        if cfg.contrastive_loss == "sigmoid":  # SigLIP's learned bias (paper init: -10)
            bias = parts.logit_bias if parts.logit_bias is not None else SIGLIP_INIT_BIAS
            self.logit_bias = nn.Parameter(torch.tensor(float(bias)))
        self.decoder = create_caption_decoder(cfg, di, caption)
        self.head = None if self.decoder is not None else create_fusion_head(
            cfg.fusion,
            di,
            dt,
            k,
            hidden=cfg.head_hidden,
            dropout=cfg.dropout,
            alpha=cfg.fusion_alpha,
            layers=cfg.fusion_layers,
        )  # fmt: skip
        # what the model is, for logs and reports (model_args are what rebuild it)
        self.config = {
            "image_encoder": cfg.pretrained or cfg.image_encoder,
            "text_encoder": cfg.pretrained or cfg.text_encoder,
            "fusion": cfg.fusion, "task": cfg.task, "image_dim": di, "text_dim": dt,
            "embed_dim": self.embed_dim, "num_outputs": k,
        }  # fmt: skip
        if cfg.contrastive_loss != "infonce":
            self.config["contrastive_loss"] = cfg.contrastive_loss
        self.audio_encoder = create_audio_encoder(cfg)
        if self.audio_encoder is not None:
            self._add_audio(cfg, k)
        # last, so models without it draw the same initial weights as before it existed
        self.itm_head = nn.Linear(cfg.head_hidden, 1) if cfg.itm_weight > 0 else None
        self.frozen: list[nn.Module] = []
        self.set_frozen(cfg.freeze_image, cfg.freeze_text)

    def _add_audio(self, cfg: ModelConfig, k: int) -> None:
        """The third modality: its projection into the shared space and its task head, whose
        logits are added to the image-text head's where a clip is present (late fusion: a
        masked clip leaves the image-text prediction exactly as without audio)."""
        da = self.audio_encoder.out_dim
        self.audio_proj = nn.Linear(da, self.embed_dim, bias=False)
        self.audio_head = nn.Sequential(
            nn.Linear(da, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, k),
        )  # fmt: skip
        self.config.update(audio_encoder=cfg.audio_encoder, audio_dim=da)

    def set_frozen(self, image: bool, text: bool, unfreeze_last: int = 0) -> None:
        """Freeze the image and/or text encoder, all but its last ``unfreeze_last`` blocks
        (each encoder's ``layer_groups()``, input to output); everything else trains."""
        self.frozen = []
        for encoder, freeze in ((self.image_encoder, image), (self.text_encoder, text)):
            encoder.requires_grad_(True)
            if not freeze:
                continue
            blocks = encoder.layer_groups() if unfreeze_last else [encoder]
            for block in blocks[: len(blocks) - unfreeze_last]:
                block.requires_grad_(False)
                self.frozen.append(block)
        self.freeze_image, self.freeze_text = image, text
        self.train(self.training)

    def train(self, mode: bool = True) -> MultimodalModel:
        """Frozen parts stay in eval mode (no dropout, BatchNorm statistics untouched); so do
        the BatchNorm layers of the trainable last blocks of a frozen tower (``unfreeze_last``:
        fine-tuning a pretrained CNN's top on small batches keeps its ImageNet statistics)."""
        super().train(mode)
        for block in getattr(self, "frozen", []):
            block.eval()
        for encoder, frozen in ((self.image_encoder, getattr(self, "freeze_image", False)),
                                (self.text_encoder, getattr(self, "freeze_text", False))):  # fmt: skip
            if frozen:
                for m in encoder.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def features(self, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled pre-fusion features: (B, Fi), (B, Ft)."""
        ei, et = self.encode(images, texts)
        return ei.pooled, et.pooled

    def encode(
        self,
        images: torch.Tensor | None,
        texts: list[str],
        image_cache: Any = None,
        text_cache: Any = None,
    ) -> tuple[Encoded, Encoded]:
        """Pooled + token features of both modalities; what the ablation heads are trained on.

        ``image_cache`` / ``text_cache`` (``features.CachedFeatures``): the features from the
        frozen-feature cache instead of the pixels / texts: the locked part is not run.
        """
        if image_cache is not None:
            ei = image_cache.encoded(self.image_encoder)
        else:
            ei = self.image_encoder.encode(images)
        if text_cache is not None:
            return ei, text_cache.encoded(self.text_encoder)
        return ei, self.text_encoder.encode(list(texts))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> L2-normalised (B, D)."""
        return F.normalize(self.image_proj(self.image_encoder(images)), dim=-1)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """list[str] -> L2-normalised (B, D)."""
        return F.normalize(self.text_proj(self.text_encoder(list(texts))), dim=-1)

    def encode_image_features(self, ei: Encoded) -> torch.Tensor:
        """Encoded image features -> L2-normalised (B, D)."""
        return F.normalize(self.image_proj(ei.pooled), dim=-1)

    def encode_text_features(self, et: Encoded) -> torch.Tensor:
        """Encoded text features -> L2-normalised (B, D)."""
        return F.normalize(self.text_proj(et.pooled), dim=-1)

    def classify(self, images: torch.Tensor, texts: list[str], **audio: Any) -> torch.Tensor:
        """Task logits (B, K); ``audio``/``audio_mask`` (``audio_inputs``) fuse the clips."""
        if audio.get("audio") is None or self.audio_encoder is None:
            return apply_head(self.head, *self.encode(images, texts))
        return self(images, texts, **audio)["logits"]

    def itm(
        self,
        ei: Encoded,
        et: Encoded,
        sim: torch.Tensor,
        groups: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ITM logits (P,) and labels (P,) of the batch's pairs + sampled negatives
        (``itm.itm_pairs``; ``sim`` (B, B) image x text, ``groups`` (B,) image ids)."""
        if self.itm_head is None:
            raise ValueError(f"fusion={self.config['fusion']} model has no ITM head")
        images, texts, labels = itm_pairs(ei, et, sim, groups, generator)
        return self.itm_head(self.head.fuse(images, texts))[:, 0], labels

    def forward(
        self,
        images: torch.Tensor | None,
        texts: list[str],
        audio: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        itm_groups: torch.Tensor | None = None,
        itm_generator: torch.Generator | None = None,
        image_cache: Any = None,
        text_cache: Any = None,
    ) -> dict[str, torch.Tensor]:
        """{"image_emb" (B, D), "text_emb" (B, D), "logit_scale" (), "logits" (B, K)}; with an
        audio encoder and ``audio`` also "audio_emb" (B, D) and "audio_mask" (B,) bool; with an
        ITM head and ``itm_groups`` (B,) (the pairs' image ids) also "itm_logits" and
        "itm_labels" (P,) of the pairs + negatives sampled by contrastive similarity (from
        ``itm_generator``, else the global RNG); captioning: "logits" (B, T, V) of the
        teacher-forced captions, "caption_target" (B, T); "logit_bias" () with the sigmoid loss.
        ``image_cache`` / ``text_cache``: cached frozen features instead of the pixels / texts."""
        ei, et = self.encode(images, texts, image_cache, text_cache)  # (B, Fi), (B, Ft) + tokens
        out = {
            "image_emb": self.encode_image_features(ei),
            "text_emb": self.encode_text_features(et),
            "logit_scale": self.scale(),
        }
        if self.contrastive_loss == "sigmoid":
            out["logit_bias"] = self.logit_bias
        if self.decoder is not None:  # captioning: the captions are the targets
            out["logits"], out["caption_target"] = self.decoder.teacher_forced(ei, list(texts))
            return out
        out["logits"] = apply_head(self.head, ei, et)
        if self.itm_head is not None and itm_groups is not None:
            sim = out["image_emb"] @ out["text_emb"].T  # (B, B)
            out["itm_logits"], out["itm_labels"] = self.itm(ei, et, sim, itm_groups, itm_generator)
        if self.audio_encoder is not None and audio is not None:
            mask = torch.ones(len(audio), dtype=torch.bool) if audio_mask is None else audio_mask
            mask = mask.to(audio.device)
            xa = self.audio_encoder(audio)  # (B, Fa)
            fused = self.audio_head(xa) * mask[:, None].to(xa.dtype)
            out.update(
                audio_emb=F.normalize(self.audio_proj(xa), dim=-1),
                audio_mask=mask,
                logits=out["logits"] + fused,
            )
        return out


def create_model(
    cfg: ModelConfig,
    num_classes: int,
    caption: dict[str, Any] | None = None,
    hf: dict[str, Any] | None = None,
    allow_download: bool = False,
) -> MultimodalModel:
    """Build the model ``cfg`` describes for a dataset with ``num_classes`` label classes;
    captioning also needs its vocabulary (``caption``: decoder.build_vocabulary's spec).

    Hugging Face parts (``cfg.pretrained`` or an ``hf:`` encoder) load their pretrained weights
    offline (a download only with ``allow_download``), or, given ``hf`` (a checkpoint's
    ``meta["hf"]``), are rebuilt from it without reading any file."""
    return MultimodalModel(cfg, num_classes, caption, hf, allow_download)


def create_caption_decoder(
    cfg: ModelConfig, image_dim: int, caption: dict[str, Any] | None
) -> CaptionDecoder | None:
    """The caption decoder of a captioning model (None for the other tasks)."""
    if not task_spec(cfg.task).captions:
        return None
    if caption is None:
        raise ValueError("train.task=captioning needs the caption vocabulary (build_vocabulary)")
    return CaptionDecoder(caption, image_dim, cfg.width, cfg.decoder_layers, cfg.dropout,
                          cfg.caption_max_words)  # fmt: skip


def info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) over a batch of N pairs; (N, D), (N, D), () -> ().

    ``groups`` (N,) marks pairs that share an image (several captions per image): those are all
    positives, with the target spread uniformly over them, instead of being pushed apart as
    false negatives. Without groups (or with all-distinct groups) it is the CLIP loss.
    """
    logits = logit_scale * image_emb.float() @ text_emb.float().T  # (N, N)
    if groups is None:
        target = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    same = (groups[:, None] == groups[None, :]).float()  # (N, N), symmetric
    target = same / same.sum(dim=1, keepdim=True)
    i2t = -(target * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target * F.log_softmax(logits.T, dim=1)).sum(1).mean()
    return 0.5 * (i2t + t2i)


def sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) over a batch of N pairs; () .

    Every (image, text) cell is an independent binary problem: +1 for a pair (or, with
    ``groups``, any two rows sharing an image), -1 otherwise; summed over cells, / N.
    """
    logits = logit_scale * image_emb.float() @ text_emb.float().T + logit_bias  # (N, N)
    if groups is None:
        same = torch.eye(len(logits), device=logits.device)
    else:
        same = (groups[:, None] == groups[None, :]).float()
    labels = 2.0 * same - 1.0
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def contrastive_objective(
    out: dict[str, torch.Tensor],
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's contrastive loss (``ModelConfig.contrastive_loss``) on (N, D) embeddings,
    with the scale (and bias) of a forward's ``out``."""
    if "logit_bias" in out:
        return sigmoid_loss(image_emb, text_emb, out["logit_scale"], out["logit_bias"], groups)
    return info_nce(image_emb, text_emb, out["logit_scale"], groups)


def audio_info_nce(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    audio_emb: torch.Tensor,
    audio_mask: torch.Tensor,
    logit_scale: torch.Tensor,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The image-audio plus the text-audio InfoNCE over the rows that have a clip; () .

    Rows without a clip take no part (masked, not an error); with fewer than two clips there is
    no negative and the loss is 0 (the graph stays whole for DDP).
    """
    m = audio_mask.bool()
    if int(m.sum()) < 2:
        return audio_emb.float().sum() * 0.0
    g = None if groups is None else groups[m]
    return info_nce(image_emb[m], audio_emb[m], logit_scale, g) + info_nce(
        text_emb[m], audio_emb[m], logit_scale, g
    )


def audio_inputs(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A loader batch's audio arguments for the model's forward ({} for image + text shards)."""
    if "audio" not in batch:
        return {}
    return {"audio": batch["audio"].to(device), "audio_mask": batch["audio_mask"].to(device)}


def batch_targets(batch: dict[str, Any], task: str) -> torch.Tensor:
    """The task's target of each pair of a loader batch.

    multilabel: (B, L) class indices, -1 padded; regression: (B,) values, nan = none; the
    classification tasks (multiclass, binary, vqa): (B,) class index, -1 = none (or ``<unk>``).
    """
    return batch[task_spec(task).target]


def labelled_rows(target: torch.Tensor, task: str) -> torch.Tensor:
    """(B,) bool: the rows of a ``batch_targets`` tensor that carry a target."""
    spec = task_spec(task)
    if spec.captions:  # token ids (B, T): a caption always has its EOS
        return (target != PAD).any(dim=1)
    if spec.target == "labels":
        return (target >= 0).any(dim=1)
    if spec.target == "value":
        return ~torch.isnan(target)
    return target >= 0


def multi_hot(label_sets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, L) class indices (-1 padded) -> (B, K) float 0/1."""
    hot = torch.zeros(len(label_sets), num_classes + 1, device=label_sets.device)
    index = torch.where(label_sets >= 0, label_sets, num_classes)  # padding -> a spare column
    return hot.scatter_(1, index, 1.0)[:, :num_classes]


def task_loss_sum(
    logits: torch.Tensor, target: torch.Tensor, task: str
) -> tuple[torch.Tensor, int]:
    """Summed task loss over labelled rows and their count; (B, K), ``batch_targets`` -> ((), n).

    A sum, not a mean, so DDP can divide by the labelled count of the GLOBAL batch. Multilabel
    BCE is averaged over the classes of a row, so a row weighs the same whatever K.
    """
    spec = task_spec(task)
    if spec.captions:
        return caption_loss_sum(logits, target)
    mask = labelled_rows(target, task)
    n = int(mask.sum())
    if n == 0:
        return logits.float().sum() * 0.0, 0  # keeps the graph whole for DDP
    return LOSSES[spec.loss](logits[mask].float(), target[mask]), n


def _multilabel_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hot = multi_hot(y, z.shape[1])
    return F.binary_cross_entropy_with_logits(z, hot, reduction="sum") / z.shape[1]


# TaskSpec.loss -> summed loss of labelled rows: (L, K) float logits, (L, ...) targets -> ()
LOSSES = {
    "cross_entropy": lambda z, y: F.cross_entropy(z, y, reduction="sum"),
    "binary_cross_entropy": lambda z, y: F.binary_cross_entropy_with_logits(
        z[:, 0], y.float(), reduction="sum"
    ),
    "multilabel_bce": _multilabel_bce,
    "mse": lambda z, y: F.mse_loss(z[:, 0], y.float(), reduction="sum"),
}


def caption_loss_sum(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy of teacher-forced captions and the token count (PAD ignored);
    (B, T, V), (B, T) -> ((), n)."""
    mask = target != PAD
    n = int(mask.sum())
    if n == 0:
        return logits.float().sum() * 0.0, 0
    return F.cross_entropy(logits[mask].float(), target[mask], reduction="sum"), n


def predict_labels(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Labels of each row: (B,) class index (argmax; binary: logit > 0), (B, K) 0/1 multi-hot
    (multilabel: logit > 0), or (B,) the predicted value (regression, float).

    The one place task-head logits become labels: training's validation, evaluate and predict.
    """
    return DECODERS[task_spec(task).decode](logits)


# TaskSpec.decode -> labels of (B, K) logits
DECODERS = {
    "positive": lambda z: (z[:, 0] > 0).long(),
    "multi_hot": lambda z: (z > 0).long(),
    "value": lambda z: z[:, 0].float(),
    "argmax": lambda z: z.argmax(dim=-1),
}


def describe(model: MultimodalModel) -> dict[str, Any]:
    """Parameter counts for logs and reports."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": total, "trainable_parameters": trainable}
