"""Typed, validated parameters: one pydantic model per stage section of ``params.yaml``.

Params are read once, at the edge (CLI, Prefect task, test), and passed down as these objects.
Every model forbids unknown keys, so a typo in ``params.yaml`` or ``--set`` fails loudly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)


class Section(BaseModel):
    """Base of every params section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TransformSpec(Section):
    """One albumentations transform, by class name, with its keyword arguments."""

    name: str = Field(description="albumentations class name, e.g. 'RandomBrightnessContrast'.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the transform."
    )


class SyntheticParams(Section):
    """The embedded default dataset (see mmpipe/synthetic.py for the generative rules)."""

    n_images: int = Field(2000, ge=1, description="Number of images to generate.")
    captions_per_image: int = Field(3, ge=1, le=20, description="Captions written per image.")
    image_size: int = Field(96, ge=16, le=1024, description="Side of the square images, pixels.")
    label_noise: float = Field(
        0.05, ge=0.0, le=0.5, description="Fraction of pairs whose label is flipped at random."
    )
    seed: int = Field(0, description="Seed; the same seed gives byte-identical files.")
    label: Literal["consistency", "sentiment", "score", "tags"] = Field(
        "consistency",
        description="What the label says (mmpipe/synthetic.py): consistency = caption sentiment "
        "agrees with the image mood (2 classes); sentiment = both positive / both negative / "
        "mixed (3 classes); score = a 1-5 rating, mood plus sentiment strength (regression); "
        "tags = the shapes in the image plus the caption's sentiment, '|'-separated (multilabel).",
    )
    questions: bool = Field(
        False,
        description="Question mode (VQA): each image gets questions whose answers need the "
        "image (colour of a shape, how many of a shape, is A left of B) instead of captions; "
        "the label is the answer, `label` is ignored.",
    )
    audio: bool = Field(
        False,
        description="Give each image a 1 s clip (audio/NNNNNN.wav, column `audio`): a chord, "
        "major for a positive mood and minor for a negative one, a second mood cue beside the "
        "palette; a few images get none (the modality is then masked). false = image + text.",
    )


class AudioParams(Section):
    """Audio clips beside images and captions (mmpipe/audio.py): which files, which limits."""

    extensions: list[str] = Field(
        default_factory=lambda: [".wav", ".flac", ".ogg"],
        description="Accepted audio file extensions (lower case); decoded with soundfile.",
    )
    min_seconds: float = Field(0.05, ge=0.0, description="Reject clips shorter than this.")
    max_seconds: float = Field(30.0, gt=0.0, description="Reject clips longer than this.")
    min_sample_rate: int = Field(8000, ge=1, description="Reject clips sampled below this (Hz).")
    max_sample_rate: int = Field(48000, ge=1, description="Reject clips sampled above this (Hz).")
    max_channels: int = Field(
        2, ge=1, description="Reject clips with more channels (shard mixes the rest to mono)."
    )


Executor = Literal["process", "dask"]


def _executor_field() -> Any:
    return Field(
        "process",
        description="Where the per-chunk work runs: `process` = a pool of `workers` processes "
        "here; `dask` = a dask.distributed cluster (byte-identical output).",
    )


def _address_field() -> Any:
    return Field(
        None,
        description="executor `dask`: the scheduler's address (e.g. tcp://10.0.0.5:8786); "
        "null = a LocalCluster of `workers` processes on 127.0.0.1.",
    )


class IngestParams(Section):
    """Stage `ingest`: read a source, validate every record, write the records table."""

    source: Literal["synthetic", "folder", "coco"] = Field(
        "synthetic", description="Which reader: generated default, folder + captions, or COCO."
    )
    root: str | None = Field(
        None,
        description="Data root for `folder`/`coco` (images must stay inside it): a directory "
        "or an fsspec URL (s3://bucket/prefix; credentials from AWS_* env), whose new or changed "
        "objects are fetched into .mmpipe/sources/ before validation. "
        "Ignored for `synthetic`, which generates into the stage's output dir.",
    )
    captions: str = Field(
        "captions.csv",
        description="Captions file relative to `root`: .csv, .jsonl, .parquet (folder) or "
        ".json (coco).",
    )
    image_column: str = Field("image", description="Column with the image path (folder).")
    caption_column: str = Field("caption", description="Column with the caption text (folder).")
    label_column: str = Field(
        "label", description="Optional column with the label (folder); absent means unlabelled."
    )
    label_separator: str | None = Field(
        None,
        description="Split each label on this string into several labels (multi-hot, e.g. "
        "'|' for 'cat|dog'); null = one label per record.",
    )
    text_columns: list[str] = Field(
        default_factory=list,
        description="Several text fields joined into the one text input (folder), e.g. "
        "[premise, hypothesis]; empty = caption_column alone. A record missing one is rejected.",
    )
    text_template: str | None = Field(
        None,
        description="How text_columns are joined: {column} placeholders, e.g. '{premise} "
        "[SEP] {hypothesis}'; null = the columns in order, joined by ' [SEP] '.",
    )
    question_column: str | None = Field(
        None,
        description="VQA (folder): the column with the question, used as the text input "
        "instead of caption_column.",
    )
    answer_column: str | None = Field(
        None,
        description="VQA (folder): the column with the answer, used as the label instead of "
        "label_column, after the standard VQA answer normalisation (lower case, no "
        "punctuation or articles, number words as digits).",
    )
    labels_file: str | None = Field(
        None,
        description="Optional CSV (file_name,label) relative to `root` giving per-image labels "
        "(coco).",
    )
    images_dir: str = Field("images", description="Image directory relative to `root` (coco).")
    audio_column: str | None = Field(
        None,
        description="Optional column with an audio clip's path relative to `root` (folder): "
        "the third modality. A row without one, or whose clip is rejected, keeps its image and "
        "caption with the audio masked; null = no audio (the outputs are as without the field).",
    )
    audio: AudioParams = Field(
        default_factory=AudioParams, description="Audio validation limits (with audio_column)."
    )
    extensions: list[str] = Field(
        default_factory=lambda: [".jpg", ".jpeg", ".png", ".webp", ".bmp"],
        description="Accepted image file extensions (lower case).",
    )
    max_pixels: int = Field(
        50_000_000, ge=1, description="Reject images above this pixel count (decompression bombs)."
    )
    min_side: int = Field(8, ge=1, description="Reject images whose shorter side is smaller.")
    image_check: Literal["decode", "header"] = Field(
        "header",
        description="How ingest checks an image. `header` (the default): format (from the "
        "content), size, min_side, max_pixels, extension and duplicates, plus a JPEG/PNG "
        "end-marker check (an image without one is decoded in full, so a cut file is still an "
        "ingest reject); the pixels are decoded once, by shard, which leaves an undecodable "
        "image's pairs out as named rejects (undecodable_image) in its rejects.jsonl, counted "
        "in its manifest (curate rejects such an image first when its hashing or scorer decodes "
        "it). `decode`: every pixel is decoded here too, so every corrupt or truncated image is "
        "an ingest reject; 0.8-0.9x `header`'s images per CPU-second of "
        "ingest+curate+align+shard on 640x480 photos (benchmarks/README.md).",
    )
    max_caption_chars: int = Field(
        2000, ge=1, description="Reject captions longer than this after normalising whitespace."
    )
    strict: bool = Field(
        False, description="Fail at the first rejected record instead of writing rejects.jsonl."
    )
    workers: int = Field(2, ge=1, description="Worker processes for image validation.")
    executor: Executor = _executor_field()
    address: str | None = _address_field()
    synthetic: SyntheticParams = Field(
        default_factory=SyntheticParams, description="Generator settings for `synthetic`."
    )


class CurateParams(Section):
    """Stage `curate`: near-duplicate image groups, image-text scores and basic filters."""

    near_duplicates: bool = Field(
        False,
        description="Group near-copies of an image (perceptual hash within hash_radius) so "
        "align puts them in one split; off = every image is its own group. Off by default: on "
        "the generated default (flat gradients + one small shape) phash groups unrelated "
        "images (docs/curation.md); turn it on for photos.",
    )
    hash_radius: int = Field(
        4,
        ge=0,
        le=16,
        description="Largest Hamming distance between two 64-bit perceptual hashes of one "
        "group. Larger finds more re-edited copies, and more false groups, more slowly.",
    )
    keep_one_per_group: bool = Field(
        False,
        description="Keep only the largest image of each near-duplicate group; the others are "
        "rejects `near_duplicate` (their pairs: `image_rejected`).",
    )
    scorer: str | None = Field(
        None,
        description="Model that scores image-text agreement (cosine of the pair's embeddings): "
        "a checkpoint or models dir, a models:/name@alias URI, `champion` (register.model_name"
        "@register.alias; none yet = nothing scored, with a warning) or hf:<id or dir> of a "
        "CLIP/SigLIP; null = no scores.",
    )
    min_score: float | None = Field(
        None, description="With a scorer: reject pairs scoring below this (`low_score`)."
    )
    keep_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="With a scorer: keep the top fraction of each source's pairs by score "
        "(`below_top_fraction`); null = off.",
    )
    min_caption_words: int | None = Field(
        None, ge=1, description="Reject captions with fewer words (`caption_too_few_words`)."
    )
    min_caption_chars: int | None = Field(
        None, ge=1, description="Reject captions with fewer characters (`caption_too_short`)."
    )
    min_image_side: int | None = Field(
        None, ge=1, description="Reject images whose shorter side is smaller (`image_too_small`)."
    )
    max_aspect_ratio: float | None = Field(
        None,
        ge=1.0,
        description="Reject images whose long side / short side is larger (`aspect_ratio`).",
    )
    languages: list[str] | None = Field(
        None,
        description="Keep captions whose detected language (py3langid, ISO 639-1, e.g. [en]) is "
        "listed (`language`); null = off.",
    )
    semantic_dedup: bool = Field(
        False,
        description="SemDeDup with the scorer's image embeddings: k-means clusters, and in each "
        "cluster an image whose cosine similarity to another exceeds semantic_threshold is a "
        "reject `semantic_duplicate` (the one farthest from the centroid stays). Needs a scorer.",
    )
    semantic_threshold: float = Field(
        0.95, gt=0.0, le=1.0, description="semantic_dedup: cosine similarity of duplicates."
    )
    semantic_clusters: int | None = Field(
        None, ge=1, description="semantic_dedup: k-means clusters; null = sqrt(images)."
    )
    batch_size: int = Field(64, ge=1, description="Images per scorer batch.")
    workers: int = Field(2, ge=1, description="Worker processes hashing images.")
    executor: Executor = _executor_field()
    address: str | None = _address_field()

    @model_validator(mode="after")
    def _scores_need_a_scorer(self) -> CurateParams:
        wants = [k for k in ("min_score", "keep_fraction") if getattr(self, k) is not None]
        wants += ["semantic_dedup"] if self.semantic_dedup else []
        if wants and not self.scorer:
            raise ValueError(f"curate.{wants[0]} needs curate.scorer (a model to embed with)")
        return self


class AlignParams(Section):
    """Stage `align`: pair images and captions, account for orphans, split by image group."""

    train: float = Field(0.8, gt=0.0, lt=1.0, description="Fraction of image groups in train.")
    val: float = Field(0.1, ge=0.0, lt=1.0, description="Fraction of image groups in val.")
    test: float = Field(0.1, gt=0.0, lt=1.0, description="Fraction of image groups in test.")
    seed: int = Field(0, description="Seed of the hash-based split (stable as data grows).")
    top_k_labels: int | None = Field(
        None,
        ge=1,
        description="Keep the K most frequent labels of the train split as the classes (VQA's "
        "answer vocabulary); other labels are `<unk>`: kept for evaluation, excluded from the "
        "loss. null = every label seen is a class.",
    )

    @model_validator(mode="after")
    def _ratios_sum_to_one(self) -> AlignParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"align.train + align.val + align.test must be 1.0, got {total:g}")
        return self


def _default_train_augment() -> list[TransformSpec]:
    # Mild, caption-preserving: no flips (captions say left/right) and no hue shifts
    # (the synthetic label depends on the warm/cool palette).
    return [
        TransformSpec(
            name="RandomBrightnessContrast",
            params={"brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
        ),
        TransformSpec(name="GaussNoise", params={"std_range": [0.01, 0.03], "p": 0.3}),
    ]


class ShardParams(Section):
    """Stage `shard`: resize, augment offline, write WebDataset tar shards + manifest."""

    image_size: int = Field(64, ge=8, le=1024, description="Side of the square stored images.")
    jpeg_quality: int = Field(90, ge=10, le=100, description="JPEG quality of stored images.")
    decode: Literal["reduced", "full"] = Field(
        "reduced",
        description="reduced: a JPEG is decoded at the smallest of libjpeg-turbo's M/8 scales "
        "that keeps both sides >= image_size (DCT-domain; ~12% less shard CPU on 640x480 photos "
        "for 256 px, ~7 dB lower PSNR than a full-resolution resize: benchmarks/README.md). "
        "full: every image decoded at full resolution, then resized (best fidelity, slowest). "
        "Recorded in the manifest and the checkpoint, so predict preprocesses the same way.",
    )
    copies: int = Field(
        3,
        ge=0,
        le=16,
        description="Extra offline-augmented copies of each train image (0 = none); each is a "
        "sample of the epoch, with a caption of its own.",
    )
    train_augment: list[TransformSpec] = Field(
        default_factory=_default_train_augment,
        description="albumentations pipeline for the offline train copies.",
    )
    eval_augment: list[TransformSpec] = Field(
        default_factory=list,
        description="albumentations pipeline applied to val/test (usually none).",
    )
    maxcount: int = Field(2000, ge=1, description="Maximum samples per shard.")
    maxsize: int = Field(100_000_000, ge=1024, description="Maximum bytes per shard.")
    workers: int = Field(2, ge=1, description="Worker processes encoding samples.")
    executor: Executor = _executor_field()
    address: str | None = _address_field()
    seed: int = Field(0, description="Seed of the offline augmentation.")
    output: str | None = Field(
        None,
        description="Also publish the committed shards to this fsspec URL (s3://bucket/prefix): "
        "a new versioned prefix, then the LATEST pointer object, so a reader never sees a "
        "partial set; the loader reads such a URL directly. Credentials from AWS_* (env). "
        "null = local data/shards only.",
    )


# a Hugging Face model by hub id or local directory (mmpipe.model.hf)
HFName = Annotated[str, StringConstraints(pattern=r"^hf:.+")]


class ModelConfig(Section):
    """The model: encoders, widths, fusion head and task; all ``mmpipe.model`` reads.

    A checkpoint stores it beside the weights as ``model_args`` (as nanoGPT does), so a model is
    rebuilt from its checkpoint alone. Its fields are the model part of the ``train`` section.
    """

    image_encoder: Literal["cnn", "resnet", "efficientnet_lite0", "patch"] | HFName = Field(
        "cnn",
        description="Image encoder: small CNN, ResNet-style, pretrained EfficientNet-Lite0, "
        "`patch` (ViLT's linear patch embedding, for fusion=single_stream), or "
        "`hf:<hub id or directory>`: any Hugging Face vision backbone (a CLIP/SigLIP vision tower, "
        "ViT, ...) with its own preprocessing (docs/real-photos.md).",
    )
    text_encoder: Literal["lstm", "transformer", "minilm", "embedding"] | HFName = Field(
        "transformer",
        description="Text encoder: biLSTM, small transformer, pretrained MiniLM, `embedding` "
        "(word embeddings only, ViLT's text side, for fusion=single_stream), or "
        "`hf:<hub id or directory>`: any Hugging Face text backbone + its tokenizer.",
    )
    pretrained: HFName | None = Field(
        None,
        description="A whole pretrained dual encoder, `hf:<hub id or directory>` of a CLIPModel "
        "or SiglipModel: both towers, its projections and temperature (and SigLIP's bias), its "
        "image size, mean/std and tokenizer; image_encoder, text_encoder and embed_dim are then "
        "unused. Usable with zero training steps (train.epochs: 0). Loaded offline unless "
        "train.allow_download.",
    )
    contrastive_loss: Literal["infonce", "sigmoid"] = Field(
        "infonce",
        description="Contrastive objective: infonce (CLIP's symmetric softmax) or sigmoid "
        "(SigLIP's pairwise sigmoid with a learned bias; init_temperature 0.1 and bias -10 as "
        "in the SigLIP paper, or the pretrained SigLIP's own).",
    )
    patch_size: int = Field(
        8, ge=2, description="Patch side in pixels of image_encoder=patch (64 px -> 8x8 patches)."
    )
    audio_encoder: Literal["none", "cnn"] = Field(
        "none",
        description="Audio encoder (shards with audio, ingest.audio_column): none = image + text "
        "only; cnn = a small CNN over log-mel spectrograms, trained with the image-audio and "
        "text-audio contrastive losses and fused into the task head (a missing clip is masked).",
    )
    freeze_image: bool = Field(False, description="Freeze the image encoder's weights.")
    freeze_text: bool = Field(False, description="Freeze the text encoder's weights.")
    vocab_size: int = Field(
        8192, ge=64, description="Hash-bucket vocabulary of the scratch text encoders."
    )
    max_tokens: int = Field(32, ge=4, description="Captions are truncated to this many tokens.")
    text_pool: Literal["mean", "cls"] = Field(
        "mean",
        description="Pooling of the scratch text encoders: masked mean, or the cls token "
        "(biLSTM: final states). MiniLM always mean-pools, as it was trained.",
    )
    text_layers: int = Field(
        2, ge=1, le=12, description="Layers of the scratch transformer text encoder."
    )
    width: int = Field(128, ge=8, description="Hidden width of the scratch encoders.")
    embed_dim: int = Field(128, ge=8, description="Dimension of the shared (contrastive) space.")
    fusion: Literal[
        "concat", "sum", "weighted", "gated", "cross_attention", "cross_attention_pooled",
        "single_stream", "late", "image_only", "text_only",
    ] = Field(
        "concat",
        description="How the classifier fuses image and text features. Pooled vectors: concat, "
        "sum, weighted, gated, cross_attention_pooled (attention over the 2 pooled vectors), "
        "late, image_only, text_only. Tokens: cross_attention (text tokens attend to image "
        "patches and back), single_stream (ViLT-style: [CLS] + word tokens + image patches in "
        "one transformer).",
    )  # fmt: skip
    fusion_layers: int = Field(
        2, ge=1, le=12, description="Transformer layers of fusion=single_stream."
    )
    fusion_alpha: float | None = Field(
        None, ge=0.0, le=1.0, description="Fixed alpha of `weighted` fusion; null = learned."
    )
    head_hidden: int = Field(256, ge=8, description="Hidden width of the task head MLP.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in the task head.")
    task: Literal["multiclass", "binary", "multilabel", "regression", "vqa", "captioning"] = Field(
        "multiclass",
        description="Task head and loss: multiclass (CE), binary (BCE), multilabel (BCE over "
        "multi-hot labels), regression (MSE on the numeric label), vqa (CE over the answer "
        "vocabulary; `<unk>` answers excluded), captioning (a transformer decoder over the "
        "image tokens, token CE with teacher forcing on the captions: needs no labels). "
        "Unlabelled data trains contrastive only (except captioning).",
    )
    caption_vocab_size: int = Field(
        5000, ge=1, description="captioning: the most frequent train words the decoder knows "
        "(others are <unk> in training and never generated). With init_from a captioning "
        "checkpoint, that checkpoint's vocabulary is used instead (its rows keep their words).",
    )  # fmt: skip
    caption_max_words: int = Field(
        24, ge=1, description="captioning: cap of the generated length in words; the longest "
        "train caption sets it when shorter.",
    )  # fmt: skip
    decoder_layers: int = Field(
        2, ge=1, le=12, description="captioning: layers of the caption decoder (width: `width`)."
    )
    init_temperature: float = Field(
        0.07, gt=0.0, description="Initial softmax temperature of InfoNCE."
    )
    itm_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of the image-text matching (ITM) loss, an auxiliary binary task "
        "beside the task loss: an ITM head on the fused output of a token-level fusion "
        "(cross_attention, single_stream) tells a pair from a negative drawn from the batch "
        "(hard negatives by contrastive similarity, as in ALBEF/ViLT). Needs no labels. "
        "0 = off (no ITM head).",
    )

    @model_validator(mode="after")
    def _pretrained_alone(self) -> ModelConfig:
        if self.pretrained and any(
            e.startswith("hf:") for e in (self.image_encoder, self.text_encoder)
        ):
            raise ValueError(
                "pretrained names both towers: leave image_encoder/text_encoder unset with it"
            )
        return self

    @model_validator(mode="after")
    def _itm_needs_tokens(self) -> ModelConfig:
        if self.itm_weight > 0 and self.fusion not in ("cross_attention", "single_stream"):
            raise ValueError(
                f"itm_weight={self.itm_weight} needs a token-level fusion (cross_attention or "
                f"single_stream), not fusion={self.fusion}"
            )
        return self


class TrainStage(Section):
    """One stage of a staged training (``train.stages``): its epochs, lr, losses and freezing.

    Fields left null take the train section's value.
    """

    name: str = Field("stage", description="Name in logs and train_report.json.")
    epochs: int = Field(1, ge=1, description="Epochs of this stage.")
    lr: float | None = Field(None, gt=0.0, description="Peak lr of this stage; null = train.lr.")
    lambda_task: float | None = Field(
        None, ge=0.0, description="Task loss weight; 0 = contrastive only; null = train's."
    )
    lambda_contrastive: float | None = Field(
        None, ge=0.0, description="Contrastive loss weight; 0 = task only; null = train's."
    )
    freeze_image: bool | None = Field(
        None, description="Freeze the image encoder in this stage; null = train.freeze_image."
    )
    freeze_text: bool | None = Field(
        None, description="Freeze the text encoder in this stage; null = train.freeze_text."
    )
    unfreeze_last: int = Field(
        0,
        ge=0,
        description="With freeze_image/freeze_text: keep the last N blocks of each frozen "
        "encoder trainable (layers, residual/conv stages).",
    )


class TrainParams(ModelConfig):
    """Stage `train`: the model (the fields of ModelConfig), then the loss, optimiser and loader."""

    lambda_task: float = Field(
        1.0,
        ge=0.0,
        description="Multitask loss = lambda_contrastive * contrastive + lambda_task * task.",
    )
    lambda_contrastive: float = Field(
        1.0, ge=0.0, description="Weight of the contrastive (InfoNCE) loss; 0 = task loss only."
    )
    init_from: str | None = Field(
        None,
        description="Warm start: load the matching weights of a checkpoint file, a models "
        "directory, a model URI (models:/mmpipe-fusion@champion) or `champion` (the registry's "
        "register.model_name@register.alias; on the first night, with none registered yet, random "
        "init with a warning); train_report.json lists what was loaded, "
        "skipped and newly initialised. null = random init. A registry source is outside "
        "DVC's view: pin a checkpoint path for `dvc repro`.",
    )
    stages: list[TrainStage] = Field(
        default_factory=list,
        description="Staged training in one run, e.g. a contrastive-only stage (lambda_task: 0) "
        "then a task stage with freeze_image; each stage has its own epochs, lr and warm-up. "
        "Empty = one stage of train.epochs at train.lr. When given, train.epochs is ignored.",
    )
    allow_download: bool = Field(
        False,
        description="Let a Hugging Face model (pretrained, image_encoder or text_encoder `hf:`) "
        "download from the hub when it is not in the local cache. false = offline: a missing "
        "model is one line naming it and how to fetch it (exit 2).",
    )
    feature_cache: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Frozen-feature cache: with the image tower locked (freeze_image; with "
        "unfreeze_last, its locked prefix), its features are computed once per (shard, encoder) "
        "and reused across epochs and runs (.mmpipe/feature-cache/ of the project). auto = on "
        "unless online_augment changes each epoch's pixels; on = also then (features of the "
        "un-augmented pixels); off = never.",
    )
    # optimisation
    epochs: int = Field(
        12,
        ge=0,
        description="Passes over the train images, one of each image's captions per pass (a "
        "new one each epoch, seeded). 0 = no training: the model as loaded (a pretrained dual "
        "encoder's zero-shot model), validated once.",
    )
    batch_size: int = Field(128, ge=1, description="Global batch size (split across DDP ranks).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    lr: float = Field(2e-3, gt=0.0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay.")
    warmup_fraction: float = Field(
        0.05,
        ge=0.0,
        le=0.5,
        description="Linear warm-up over this fraction of the optimiser steps (of each stage), "
        "then cosine decay to 0.",
    )
    warmup_steps: int | None = Field(
        50,
        ge=0,
        description="Warm-up steps (null: warmup_fraction of the steps instead); capped at half "
        "of the (stage's) steps, so on small data the lr still peaks and decays. 50 is the "
        "default run's schedule: with the 5 % fraction (30 steps) it ended at 0.56 validation "
        "accuracy instead of 0.92 (docs/tasks-and-models.md).",
    )
    encoder_lr_scale: float = Field(
        1.0,
        gt=0.0,
        description="The encoders' trainable parameters learn at lr x this; projections, "
        "temperature and heads at lr. Below 1 for pretrained towers (e.g. 0.02: 2e-5 under a "
        "1e-3 head lr), as in LiT and CLIP fine-tuning.",
    )
    unfreeze_last: int = Field(
        0,
        ge=0,
        description="With freeze_image/freeze_text: keep the last N layer groups of each frozen "
        "encoder trainable (``layer_groups``: transformer layers, conv blocks, the final norm/"
        "head). Stages set their own.",
    )
    grad_cache: bool = Field(
        False,
        description="Feature-cached gradient accumulation (open_clip's accum_freq, GradCache): "
        "with grad_accum > 1 the contrastive loss sees the whole batch_size, not one "
        "micro-batch: embeddings of every micro-batch are computed without gradients first, then "
        "each micro-batch is re-run with gradients against them. Costs one extra forward.",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Activation (gradient) checkpointing in the Hugging Face and MiniLM towers: "
        "less memory for a larger batch, about one more forward of compute.",
    )
    grad_clip: float = Field(1.0, ge=0.0, description="Max gradient norm (0 = no clipping).")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision: auto = bf16 on capable CUDA, off on CPU."
    )
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    seed: int = Field(0, description="Seed of init, shuffling and dropout.")
    # loader
    num_workers: int = Field(1, ge=0, description="DataLoader worker processes.")
    shuffle_buffer: int = Field(
        1000, ge=0, description="WebDataset sample shuffle buffer (0 = off)."
    )
    online_augment: list[TransformSpec] = Field(
        default_factory=list,
        description="albumentations pipeline applied while loading train batches.",
    )
    max_bad_samples: int = Field(
        0,
        ge=0,
        description="Train samples per epoch that may fail to decode (counted and named in the "
        "log) before the run fails naming their shards; 0 = any bad sample fails it.",
    )

    def model_args(self) -> ModelConfig:
        """The model part of these params (what a checkpoint stores as ``model_args``)."""
        return ModelConfig.model_validate(self.model_dump(include=set(ModelConfig.model_fields)))

    def stage_plan(self) -> list[TrainStage]:
        """The stages to run, every field filled in (one stage when ``stages`` is empty)."""
        base = {
            "lr": self.lr, "lambda_task": self.lambda_task,
            "lambda_contrastive": self.lambda_contrastive,
            "freeze_image": self.freeze_image, "freeze_text": self.freeze_text,
        }  # fmt: skip
        one = TrainStage(name="train", epochs=max(self.epochs, 1), unfreeze_last=self.unfreeze_last)
        stages = self.stages or [one]
        return [
            s.model_copy(update={k: v for k, v in base.items() if getattr(s, k) is None})
            for s in stages
        ]

    def total_epochs(self) -> int:
        """Epochs of the whole training (the stages' sum when staged)."""
        return sum(s.epochs for s in self.stages) if self.stages else self.epochs


class EvaluateParams(Section):
    """Stage `evaluate`: retrieval, classification, zero-shot and the fusion ablation."""

    batch_size: int = Field(256, ge=1, description="Batch size for embedding the test split.")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], description="K of recall@K.")
    ablation: bool | Literal["auto"] = Field(
        "auto",
        description="Train every fusion head on frozen features and compare. auto: on in the "
        "nightly flow, `dvc repro` and `mmpipe evaluate`, off in an experiment (`dvc exp run`, "
        "which sets DVC_EXP_BASELINE_REV), so an experiment's evaluate costs no more than the "
        "night's scoring; `dvc exp run -S evaluate.ablation=true` runs it there too.",
    )
    ablation_epochs: int = Field(30, ge=1, description="Epochs of each ablation head.")
    ablation_tokens: bool = Field(
        False,
        description="Also train the token-level heads (cross_attention, single_stream) in the "
        "ablation. Off by default: they keep every scored train pair's tokens in memory (pairs "
        "x (image grid + caption tokens) x encoder width floats, ~25x the pooled features at the "
        "defaults) and train about 10x slower than the pooled heads (measured under load: "
        "minutes per head at the default size, against seconds).",
    )
    beam_size: int = Field(
        3, ge=1, le=16, description="captioning: beams of the decoder's beam search (1 = greedy)."
    )
    zero_shot_field: str | None = Field(
        "main_shape", description="Metadata field holding the zero-shot class; null = skip."
    )
    zero_shot_template: str = Field(
        "a {}", description="Prompt template for zero-shot class names."
    )
    zero_shot_classes: list[str] = Field(
        default_factory=list,
        description="Class names for zero-shot; images whose zero_shot_field value is not "
        "among them are left out. Empty = the field's distinct values in the test split.",
    )


class RegisterParams(Section):
    """Stage `register`: version the model and move the champion alias only on improvement."""

    model_name: str = Field("mmpipe-fusion", description="MLflow registered model name.")
    alias: str = Field("champion", description="Alias given to the best version.")
    metric: str | None = Field(
        None,
        description="metrics.json key compared against the champion; null = the task's "
        "default: accuracy (multiclass), macro_f1 (binary), map (multilabel), rmse "
        "(regression), vqa_accuracy (vqa), mean_r1 (retrieval) without labelled pairs. A metric "
        "the run cannot produce is an error before training.",
    )
    greater_is_better: bool | None = Field(
        None, description="Direction of `metric`; null = the metric's own (rmse, mae: lower)."
    )
    chance_margin: float | None = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Promote only a model whose `metric` clears its chance level on the test "
        "split (the input-blind guess, or a random ranking for R@K) by this fraction of the way "
        "from chance to a perfect score (1; 0 for rmse/mae): 0.1 with mean_r1 chance 0.25 needs "
        "0.325. Below that the version is registered without the alias and says why. null = no "
        "chance check (smoke tests of the pipeline's mechanics only).",
    )


class TrackingParams(Section):
    """MLflow tracking (not a stage: read by train, evaluate and register)."""

    uri: str | None = Field(
        None,
        description="Tracking URI; null = sqlite:///<project>/.mmpipe/mlflow.db (absolute), "
        "artifacts in .mmpipe/mlartifacts. A relative sqlite path is relative to the project; "
        "env MLFLOW_TRACKING_URI overrides both.",
    )
    experiment: str = Field("mmpipe", description="MLflow experiment name.")
    artifacts: str | None = Field(
        None,
        description="Artifact root of the experiment on a database store (postgresql://, "
        "mysql://), e.g. s3://bucket/mlartifacts (credentials and endpoint from AWS_* / "
        "MLFLOW_S3_ENDPOINT_URL, never params); null = <project>/.mmpipe/mlartifacts. A sqlite "
        "store keeps artifacts beside its DB file and a tracking server decides for itself.",
    )


# `register` is a stage name; pydantic warns that it shadows ABCMeta.register on the class, which is
# harmless for instances (params.register is the section).
warnings.filterwarnings("ignore", message='Field name "register" in "Params"')


class Params(Section):
    """All of ``params.yaml``."""

    ingest: IngestParams = Field(default_factory=IngestParams, description="Stage ingest.")
    curate: CurateParams = Field(default_factory=CurateParams, description="Stage curate.")
    align: AlignParams = Field(default_factory=AlignParams, description="Stage align.")
    shard: ShardParams = Field(default_factory=ShardParams, description="Stage shard.")
    train: TrainParams = Field(default_factory=TrainParams, description="Stage train.")
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams, description="Stage evaluate.")
    register: RegisterParams = Field(default_factory=RegisterParams, description="Stage register.")
    tracking: TrackingParams = Field(default_factory=TrackingParams, description="MLflow tracking.")

    @model_validator(mode="after")
    def _register_metric_fits_the_task(self) -> Params:
        from mmpipe.objectives import check_metric_for_task

        check_metric_for_task(self.register.metric, self.train.task, self.evaluate.ks)
        return self


class ParamsError(ValueError):
    """A params file or override that does not validate; the message names the key."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is parsed as YAML (so 3, 0.5, true, [a, b] work)."""
    if "=" not in text:
        raise ParamsError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"--set {key}: value {raw!r} is not valid YAML: {exc}") from None
    return key.strip(), value


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid params in {origin}:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "params"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not a field of this section)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def params_file(path: str | Path, project_dir: str | Path = ".") -> Path:
    """The params file a command means: the default ``params.yaml`` is inside ``--project-dir``
    (a ``--params`` given on a command line is already absolute: ``_WorkingDirPath``)."""
    path = Path(path)
    return path if path.is_absolute() else Path(project_dir) / path


def load_params(
    path: str | Path | None = "params.yaml", overrides: list[str] | None = None
) -> Params:
    """Read params.yaml (the defaults if ``path`` is None), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ParamsError(f"params file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ParamsError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ParamsError(f"{p}: expected a mapping of sections at the top level")
        origin = str(p)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        origin += f" + --set {text}"
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError(_format_validation_error(exc, origin)) from None


class _WorkingDirPath(argparse.Action):
    """A path given on the command line, made absolute against the working directory (where the
    user typed it), so a flow or a scheduled run that gets it later reads the same file."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, os.path.abspath(values))


def add_params_arguments(parser: argparse.ArgumentParser, *, writes: bool = False) -> None:
    """``--params``, ``--set`` and ``--project-dir``: how every command line names its params.

    ``writes``: the command writes the project (a stage, a run, the flow), so it takes the
    project lock and gets ``--wait-lock SECONDS`` (default 0: fail at once when busy).
    """
    parser.add_argument(
        "--params",
        default="params.yaml",
        action=_WorkingDirPath,
        help="params file; a relative path is relative to the working directory (default: "
        "params.yaml in --project-dir)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param (repeatable); the value is parsed as YAML",
    )
    parser.add_argument(
        "--project-dir", default=".", help="project directory holding data/, models/, reports/"
    )
    if writes:
        parser.add_argument(
            "--wait-lock",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="if another run holds the project, wait up to this long for it (default: 0, "
            "fail at once with 'project busy')",
        )


def params_from_args(args: argparse.Namespace, *, file_optional: bool = False) -> Params:
    """The params that ``add_params_arguments``' options name, validated.

    ``file_optional``: a missing default ``params.yaml`` means the defaults (commands such as
    ``mmpipe predict`` also work outside a project); a ``--params`` given explicitly must exist.
    """
    path: Path | None = params_file(args.params, args.project_dir)
    if file_optional and args.params == "params.yaml" and not path.is_file():  # (the default)
        path = None
    return load_params(path, args.overrides)


def section_hash(section: BaseModel, exclude: set[str] | None = None) -> str:
    """Stable short hash of a params section (used in manifests and cache keys)."""
    blob = json.dumps(section.model_dump(mode="json", exclude=exclude), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def flatten(params: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{"train.lr": 0.002, ...}`` (lists/dicts JSON-encoded) for MLflow params."""
    tree = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in tree.items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    elif isinstance(value, list | dict):
        out[key] = json.dumps(value, sort_keys=True)
    else:
        out[key] = value


def describe_section(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for each field, recursing into sub-sections (for --help).

    A field with a fixed set of values ends its description with them.
    """
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section) and ann is not TransformSpec:
            rows.extend(describe_section(ann, f"{prefix}{name}."))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [
                d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default
            ]
        description = field.description or ""
        if choices := _choices(ann):
            description += f" One of: {', '.join(choices)}."
        rows.append((f"{prefix}{name}", json.dumps(default), description))
    return rows


def _choices(annotation: Any) -> list[str]:
    """The values of a ``Literal[...]`` field (also inside ``X | None``); [] for any other type."""
    if get_origin(annotation) is Literal:
        return [str(v) for v in get_args(annotation)]
    return [c for arg in get_args(annotation) for c in _choices(arg)]
