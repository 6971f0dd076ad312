"""Stage `train`: the dual encoder + fusion classifier on the WebDataset shards.

    run_train(shard_dir, p, out_dir)   -> out_dir/ last.pt, best.pt, train_report.json

``train_loop`` is the whole training loop, top to bottom: epochs of micro-batches, an optimiser
step every ``grad_accum`` of them, validation and checkpoints at each epoch's end. What it
works with is built once by ``create_trainer``; where it stands (step, epoch, best metric) is a
``Progress`` that checkpoints save and ``--resume`` restores.

Where checkpoints go: a run writes them into ``<out_dir>.partial/`` (``models.partial/``) and
switches the finished model in as ``out_dir`` in one atomic step (mmpipe.commit), so readers
(evaluate, register, DVC) see the previous model or the new one, never a half-trained one.
SIGTERM (or Ctrl-C) only sets a flag (mmpipe.signals): the loop stops at the next optimiser-step
boundary, saves last.pt and raises ``Interrupted``; ``--resume`` continues it, but only if it
was made from the same params and data (``resume_key``: the train params that shape the result
+ the shard manifest's sha256), and refuses otherwise.

Single process or DDP under ``torchrun`` (mmpipe.distributed). ``p.batch_size`` is the global
batch of one optimiser step: each rank loads batch_size / (world_size * grad_accum) samples per
micro-batch. The contrastive loss is computed over the gathered global batch (all_gather WITH
gradient), and the task loss is normalised by the global labelled count, so DDP computes the same
gradient as one process would.

Exact resume: checkpoints hold model/optimizer/scheduler/scaler state, the data position
(epoch, micro-batch) and the RNG states. The loader order is a function of (seed, epoch), so
resuming rebuilds the epoch's loader, skips the consumed micro-batches and restores the RNGs:
on CPU with num_workers=0 the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe import featurecache, signals
from mmpipe import metrics as M
from mmpipe.checkpoint import (
    BEST,
    LAST,
    read_checkpoint,
    save_checkpoint,
)
from mmpipe.commit import staged_dir
from mmpipe.config import TrainParams, TrainStage
from mmpipe.data import create_dataloader, iterate_split, label_value
from mmpipe.distributed import (
    Dist,
    all_gather_grad,
    all_reduce_sum,
    barrier,
    close_distributed,
    init_distributed,
    same_on_every_rank,
)
from mmpipe.errors import InputError
from mmpipe.faults import fault_point
from mmpipe.io import link_or_copy, remove_temps, use_compute_allocator, write_json_atomic
from mmpipe.manifest import Manifest, manifest_sha256, read_manifest, shard_location
from mmpipe.model import (
    MultimodalModel,
    audio_info_nce,
    audio_inputs,
    contrastive_objective,
    create_model,
    predict_labels,
)
from mmpipe.model.decoder import build_vocabulary
from mmpipe.model.itm import itm_loss
from mmpipe.model.multimodal import batch_targets, labelled_rows, multi_hot, task_loss_sum
from mmpipe.progress import tqdm  # a bar on a terminal, a log line every minute elsewhere
from mmpipe.storage import redact
from mmpipe.taskspec import task_spec

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


# ----------------------------------------------------------------------------- the job


@dataclass
class Trainer:
    """The fixed parts of one training job, built once by ``create_trainer``."""

    p: TrainParams
    d: Dist
    device: torch.device
    amp: torch.dtype | None
    model: MultimodalModel  # the raw module: state_dict keys never carry DDP/compile prefixes
    net: torch.nn.Module  # what is called: model, DDP(model) or compile(DDP(model))
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    micro_batch: int
    steps_per_epoch: int
    val_count: int
    meta: dict[str, Any]  # classes, num_classes, image_size, model_args, ...: in every checkpoint
    stages: list[TrainStage] = field(default_factory=list)  # p.stage_plan()
    stage: int = 0  # the stage the optimizer and scheduler belong to
    warmup: int = 0  # warm-up steps of the current stage
    task_loss: str = "on"  # "on", or why it is off (no labelled train pairs)
    init: dict[str, Any] | None = None  # what init_from loaded, skipped and left new
    cache_dir: Path | None = None  # where the frozen-feature cache lives (None: not cached)
    shard_dir: str | Path | None = None  # the shards the cache is built from
    manifest: Manifest | None = None
    features: featurecache.FeatureCache | None = None  # the current stage's cached image side
    text_features: featurecache.FeatureCache | None = None  # ... and text side
    cache_report: dict[str, Any] | None = None
    channels_last: bool = False  # conv image encoder on CUDA: NHWC kernels (tensor cores)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast, or nothing."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


@dataclass
class Progress:
    """Where training stands: what a checkpoint records beside the weights, and resume restores."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch


def create_trainer(
    p: TrainParams,
    d: Dist,
    manifest: Manifest,
    init_checkpoint: Path | None = None,
    caption: dict[str, Any] | None = None,
    shard_dir: str | Path | None = None,
    cache_dir: Path | None = None,
) -> Trainer:
    """Model (warm-started from ``init_checkpoint``), the first stage's optimiser and schedule,
    AMP and (if distributed) the DDP wrapper, all seeded. ``caption``: captioning's vocabulary
    (``caption_vocabulary``). With ``cache_dir`` and a locked image tower, the first stage's
    frozen features are loaded or computed there (``mmpipe.featurecache``) from ``shard_dir``."""
    device, classes = resolve_device(p, d), list(manifest.classes)
    check_task_data(p, manifest)
    amp = resolve_amp(p, device)
    seed_everything(p.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = create_model(p.model_args(), len(classes), caption, allow_download=p.allow_download)
    model = model.to(device)
    check_image_size(model, manifest)
    if p.grad_checkpointing:
        enable_grad_checkpointing(model)
    init = load_matching(model, init_checkpoint) if init_checkpoint is not None else None
    if p.compile and device.type != "cuda":
        log.warning("train.compile is ignored on CPU")
    micro = micro_batch_size(p, d)
    per_rank = manifest.count("train") // d.world_size
    batches = per_rank // micro if d.enabled else math.ceil(per_rank / micro)
    steps_per_epoch = max(1, math.ceil(batches / p.grad_accum))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    meta = {
        "classes": classes, "num_classes": len(classes), "image_size": manifest.image_size,
        "decode": manifest.decode,
        "task": p.task, "params": p.model_dump(mode="json"),
        "model_args": p.model_args().model_dump(mode="json"), "model_config": model.config,
        "params_hash": manifest.params_hash,
    }  # fmt: skip
    if caption is not None:
        meta["caption"] = caption
    if model.hf_specs:  # what rebuilds the Hugging Face parts without their directories
        meta["hf"] = model.hf_specs
    val_count = manifest.count("val")
    channels_last = use_channels_last(model, device)
    stages = p.stage_plan()
    optimizer, scheduler, warmup = stage_optimizer(model, p, stages[0], steps_per_epoch)
    t = Trainer(p, d, device, amp, model, model, optimizer, scheduler, scaler, micro,
                steps_per_epoch, val_count, meta, stages, warmup=warmup,
                task_loss=task_loss_status(p, manifest), init=init, cache_dir=cache_dir,
                shard_dir=shard_dir, manifest=manifest, channels_last=channels_last)  # fmt: skip
    start_stage(t)
    return t


CONV_ENCODERS = ("cnn", "resnet", "efficientnet_lite0")


def use_channels_last(model: MultimodalModel, device: torch.device) -> bool:
    """Convert a conv image encoder to channels_last on CUDA (NHWC: faster convolutions under
    autocast); False elsewhere (CPU, and transformer image towers, which have no convolutions
    to speed up)."""
    if device.type != "cuda" or model.config["image_encoder"] not in CONV_ENCODERS:
        return False
    model.image_encoder.to(memory_format=torch.channels_last)
    return True


def check_image_size(model: MultimodalModel, manifest: Manifest) -> None:
    """InputError when a Hugging Face vision tower takes another image size than the shards'."""
    from mmpipe.model.hf import expected_image_size

    wanted = expected_image_size(model.hf_specs)
    have = manifest.image_size
    if wanted and have and int(have) != wanted[1]:
        raise InputError(
            f"train: hf:{wanted[0]} takes {wanted[1]} px images (its processor config) but the "
            f"shards hold {have} px images; set shard.image_size={wanted[1]} and shard again"
        )


def enable_grad_checkpointing(model: MultimodalModel) -> None:
    """Activation checkpointing in the towers that support it (HF backbones, MiniLM)."""
    from mmpipe.model.hf import set_gradient_checkpointing

    done = [name for name in ("image_encoder", "text_encoder")
            if set_gradient_checkpointing(getattr(model, name))]  # fmt: skip
    if not done:
        log.warning("train.grad_checkpointing: no tower of this model supports it; ignored")
    else:
        log.info("train: gradient checkpointing in %s", ", ".join(done))


def check_task_data(p: TrainParams, manifest: Manifest) -> None:
    """InputError when the shards' labels cannot train ``p.task`` (before any work)."""
    classes, multi = manifest.classes, manifest.multi_label_pairs
    spec = task_spec(p.task)
    if p.task == "binary" and len(classes) > 2:
        raise InputError(f"train.task=binary but the manifest lists {len(classes)} classes")
    if multi and spec.target != "labels" and spec.needs_labels:  # captioning ignores labels
        raise InputError(
            f"train.task={p.task} but {multi} pairs carry several labels "
            f"(ingest.label_separator={manifest.label_separator!r}); use "
            "train.task=multilabel"
        )
    if p.audio_encoder != "none" and manifest.audio is None:
        raise InputError(
            f"train.audio_encoder={p.audio_encoder} but the shards carry no audio; set "
            "ingest.audio_column (or ingest.synthetic.audio) or train.audio_encoder=none"
        )
    if spec.captions and p.audio_encoder != "none":
        raise InputError(f"train.task={p.task} does not use audio; set train.audio_encoder=none")
    if spec.target == "value":
        bad = next((c for c in classes if math.isnan(label_value(c))), None)
        if bad is not None:
            raise InputError(f"train.task=regression but label {bad!r} is not a number")


def task_loss_status(p: TrainParams, manifest: Manifest) -> str:
    """ "on", or why the task loss is off: contrastive training only, said once in the log."""
    if not task_spec(p.task).needs_labels:
        return "on"  # captioning: the captions are the targets
    if manifest.labelled("train"):
        return "on"
    reason = f"off: no labelled train pairs (labels: {manifest.labels})"
    log.info("train: task loss %s; training the contrastive objective only", reason)
    return reason


def wrap_model(t: Trainer) -> torch.nn.Module:
    """What the loop calls: the model, in DDP (re-made when freezing changes), compiled on CUDA."""
    net: torch.nn.Module = t.model
    if t.d.enabled:
        if t.device.type == "cuda" and not t.model.freeze_image:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # EfficientNet's BN
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[t.device.index] if t.device.type == "cuda" else None
        )
    if t.p.compile and t.device.type == "cuda":
        net = torch.compile(net)
    return net


def stage_optimizer(
    model: MultimodalModel, p: TrainParams, s: TrainStage, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, int]:
    """Stage ``s``'s freezing applied to ``model``, a fresh AdamW at its lr (the encoders' at
    lr x encoder_lr_scale) and its warm-up + cosine: (optimizer, scheduler, warm-up steps)."""
    model.set_frozen(bool(s.freeze_image), bool(s.freeze_text), s.unfreeze_last)
    steps = steps_per_epoch * s.epochs
    warmup = warmup_steps(p, steps)
    groups = param_groups(model, p.weight_decay, s.lr, p.encoder_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.98))
    schedule = partial(warmup_cosine, warmup=warmup, total=steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), warmup


def enter_stage(t: Trainer, index: int) -> None:
    """Switch to stage ``index``: its freezing, optimiser and schedule (``stage_optimizer``),
    then ``start_stage``."""
    t.optimizer, t.scheduler, t.warmup = stage_optimizer(
        t.model, t.p, t.stages[index], t.steps_per_epoch
    )
    t.stage = index
    start_stage(t)


def start_stage(t: Trainer) -> None:
    """What the current stage calls (the model, in DDP for its freezing) and its frozen-feature
    cache."""
    s = t.stages[t.stage]
    t.net = wrap_model(t)
    load_features(t, s)
    if len(t.stages) > 1:
        log.info("train: stage %d/%d %r: %d epochs, lr %g, warm-up %d of %d steps, %s",
                 t.stage + 1, len(t.stages), s.name, s.epochs, s.lr, t.warmup,
                 t.steps_per_epoch * s.epochs, describe_freezing(s))  # fmt: skip


def load_features(t: Trainer, s: TrainStage) -> None:
    """The stage's frozen-feature caches (``mmpipe.featurecache``) of a locked image tower (or
    its locked prefix) and a locked text tower; None where a tower has none.

    Rank 0 computes missing files first; the other ranks then read them."""
    t.features = t.text_features = None
    if t.cache_dir is None or t.manifest is None:
        return
    plans = {
        "image": featurecache.plan(
            t.model, t.p.feature_cache, bool(t.p.online_augment), s.unfreeze_last
        ) if s.freeze_image else None,
        "text": featurecache.text_plan(t.model, t.p.feature_cache)
        if s.freeze_text and not s.unfreeze_last else None,
    }  # fmt: skip
    reports = {}
    for tower, plan in plans.items():
        if plan is None:
            continue
        build = partial(featurecache.build, t.model, plan, t.shard_dir, t.manifest, t.cache_dir,
                        t.device)  # fmt: skip
        cache = None
        if t.d.main:
            cache, reports[tower] = build()
        barrier(t.d)
        if not t.d.main:
            cache, reports[tower] = build()
        if tower == "image":
            t.features = cache
        else:
            t.text_features = cache
    t.cache_report = reports.get("image") or reports.get("text")
    if reports:
        t.cache_report = {**t.cache_report, "towers": reports}


def describe_freezing(s: TrainStage) -> str:
    """'image frozen (last 2 blocks trainable), text trainable' for logs and the report."""
    parts = []
    for name, frozen in (("image", s.freeze_image), ("text", s.freeze_text)):
        tail = f" (last {s.unfreeze_last} blocks trainable)" if frozen and s.unfreeze_last else ""
        parts.append(f"{name} {'frozen' if frozen else 'trainable'}{tail}")
    return ", ".join(parts)


def stage_at(t: Trainer, epoch: int) -> int:
    """The index of the stage that epoch ``epoch`` (0-based) belongs to."""
    end = 0
    for i, s in enumerate(t.stages):
        end += s.epochs
        if epoch < end:
            return i
    return len(t.stages) - 1


def warmup_steps(p: TrainParams, steps: int) -> int:
    """Warm-up steps of a stage of ``steps`` steps: warmup_steps or warmup_fraction of them,
    at most half, so the lr peaks and decays on any data size."""
    wanted = p.warmup_steps if p.warmup_steps is not None else round(p.warmup_fraction * steps)
    return min(wanted, steps // 2)


def load_matching(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Copy the checkpoint's weights whose name and shape match; what was loaded, skipped, new.

    Skipped: in the checkpoint but absent here or shaped differently (e.g. a head for other
    classes); new: here but not loaded (they keep their fresh initialisation).
    """
    source = read_checkpoint(path)["model"]
    own = model.state_dict()
    loaded = [k for k, v in source.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({**own, **{k: source[k] for k in loaded}})
    skipped = sorted(
        f"{k} ({'not in this model' if k not in own else 'shape differs'})"
        for k in source if k not in loaded
    )  # fmt: skip
    new = sorted(k for k in own if k not in set(loaded))
    if not loaded:
        log.warning("train.init_from %s: no weight matches this model; nothing loaded", path)
    log.info("train.init_from %s: %d tensors loaded, %d skipped, %d newly initialised",
             path, len(loaded), len(skipped), len(new))  # fmt: skip
    return {"source": str(path), "loaded": len(loaded), "loaded_modules": _modules(loaded),
            "skipped": skipped, "new": new}  # fmt: skip


def _modules(names: list[str]) -> list[str]:
    """Top-level module names of state_dict keys ('image_encoder', 'head', ...), in order."""
    return list(dict.fromkeys(k.split(".", 1)[0] for k in names))


# ----------------------------------------------------------------------------- the loop


def run_train(
    shard_dir: str | Path,
    p: TrainParams,
    out_dir: Path,
    *,
    resume: bool = False,
    max_steps: int | None = None,
    on_epoch_end: EpochCallback | None = None,
    fetch_model: ModelFetcher | None = None,
    data_sha256: str | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Train on ``shard_dir`` (a directory or a published shard set's URL, ``storage``); the
    finished model replaces ``out_dir`` whole; returns the report.

    Checkpoints go to the work directory ``<out_dir>.partial/`` (``partial_dir``) every epoch and
    on SIGTERM/Ctrl-C; ``out_dir`` (best.pt, last.pt, train_report.json) is
    switched in atomically only when training completes, so a kill leaves the previous model or
    the new one. ``resume`` continues the work directory's checkpoint if it was made with the
    same params and data (``resume_key``), and refuses otherwise. A signal checkpoints, then
    raises ``Interrupted``; ``max_steps`` (tests, benchmarks) stops after that many optimiser steps
    with a checkpoint and returns the report (``interrupted: true``) without installing anything.
    ``on_epoch_end(epoch, metrics)`` runs on rank 0 after each epoch (MLflow logging).
    ``fetch_model``: how ``resolve_init_from`` fetches a registry ``p.init_from`` (the
    pipeline's, through the tracking store); a resumed run reads no init_from: its weights come
    from the work directory's last.pt. ``data_sha256``: the shard manifest's sha256 where the
    caller has it (``pipeline.shard_source``), else read here; train_report.json records it
    (``data_hash``). ``cache_dir``: where the frozen-feature cache lives
    (``mmpipe.featurecache``; None = no cache).
    """
    shard_dir, out_dir = shard_location(shard_dir), Path(out_dir)
    use_compute_allocator()  # not a data stage's malloc setting of this process
    work = partial_dir(out_dir)
    manifest = read_manifest(shard_dir, require="train")
    key = resume_key(p, data_sha256 or manifest_sha256(shard_dir))
    resuming = resume and (work / LAST).is_file()
    init = None if resuming else resolve_init_from(p.init_from, fetch_model)
    extra = {"data_hash": key["data_sha256"]}  # installed with the model, atomically
    if p.init_from and not resuming and init is None:
        extra["init_from"] = f"{p.init_from}: none yet (first night), random init"
    spec = task_spec(p.task)
    d = init_distributed(p.device)
    try:
        if not same_on_every_rank(key["data_sha256"], d):  # e.g. LATEST moved as nodes started
            raise InputError(f"{redact(str(shard_dir))}: the ranks of this job read different "
                             "shard versions (manifest sha256); start the job again")  # fmt: skip
        with signals.deferred():
            source = work / LAST if resuming else init
            caption = caption_vocabulary(shard_dir, p, source) if spec.captions else None
            t = create_trainer(p, d, manifest, init, caption, shard_dir, cache_dir)
            t.meta["resume_key"] = key
            at, rng = start_or_resume(t, work, resume)
            report = train_loop(shard_dir, work, t, at, rng, max_steps, on_epoch_end)
            add_cache_time(t, report)
            if report["stopped_by"] == "signal":
                raise interrupted(at, work)
            if report["stopped_by"] is None and d.main:
                installed = {k: v for k, v in report.items() if k not in UNVERSIONED}
                install_model(work, out_dir, {**installed, **extra})
        signals.raise_if_requested(f"after train finished ({out_dir} holds the new model)")
        return {**report, **extra}
    finally:
        close_distributed(d)


# what the returned report has but the installed train_report.json must not (it is versioned:
# the same run twice gives the same bytes): timings, and the cache's local paths
UNVERSIONED = ("seconds", "feature_cache")


def add_cache_time(t: Trainer, report: dict[str, Any]) -> None:
    """The frozen-feature pass belongs to the stage's time: ``seconds`` includes it (MLflow's
    train_seconds), ``feature_cache`` says what it did; the stage's one "train stage took" line
    says both."""
    towers = (t.cache_report or {}).get("towers", {})
    if not towers:
        log.info("train stage took %.1f s", report["seconds"])
        return
    cache = sum(r["seconds"] for r in towers.values())
    report["seconds"] = round(report["seconds"] + cache, 3)
    report["feature_cache"] = towers
    log.info("train stage took %.1f s (frozen-feature pass %.1f s, %s)", report["seconds"], cache,
             ", ".join(f"{k}: {r['shards_built']} shard(s) encoded, {r['shards_reused']} reused"
                       for k, r in towers.items()))  # fmt: skip


def caption_vocabulary(
    shard_dir: Path, p: TrainParams, source: Path | None = None
) -> dict[str, Any]:
    """Captioning's vocabulary and max length, from the train split's captions.

    ``source`` (the init_from checkpoint, or the resumed last.pt): when it holds a captioning
    decoder, its vocabulary is kept, so every loaded embedding/output row keeps its word (a
    vocabulary rebuilt from other captions would put the same size in another order and load
    the rows under the wrong words); train words it lacks are ``<unk>``, said in the log.
    """
    texts = [sample["txt"] for sample in iterate_split(shard_dir, "train")]
    spec = build_vocabulary(texts, p.caption_vocab_size, p.caption_max_words)
    old = read_checkpoint(source).get("caption") if source is not None else None
    if not old:
        return spec
    vocab = list(old["vocab"])
    unknown = sorted(set(spec["vocab"]) - set(vocab))
    if unknown:
        log.warning("train: the captioning vocabulary of %s (%d words) lacks %d of this run's "
                    "%d train words (%s...): they are <unk>", source, len(vocab), len(unknown),
                    len(spec["vocab"]), ", ".join(unknown[:5]))  # fmt: skip
    return {**spec, "vocab": vocab}


# fetches a model registry source (``champion``, ``models:/...``, ``runs:/...``, a URL) as a
# local checkpoint; None: ``champion`` has no version yet (the first night)
ModelFetcher = Callable[[str], Path | None]


def resolve_init_from(source: str | None, fetch_model: ModelFetcher | None = None) -> Path | None:
    """The checkpoint file ``train.init_from`` names, resolved once, before training: None for
    none; a local file or models directory as is; a registry source through ``fetch_model``
    (None from it: random init, said in train_report.json). Without ``fetch_model`` a registry
    source is an InputError: a warm start that silently started cold would hide it."""
    from mmpipe.checkpoint import pick_checkpoint

    if not source:
        return None
    if "://" in source or source.startswith(("models:/", "runs:/")) or source == "champion":
        if fetch_model is None:
            raise InputError(
                f"train.init_from={source!r} names the model registry: run train through "
                "`mmpipe train`/`mmpipe run` (they fetch it), or give a checkpoint path"
            )
        return fetch_model(source)
    return pick_checkpoint(source)


def partial_dir(out_dir: Path) -> Path:
    """Where a run's checkpoints live until it completes: ``models`` -> ``models.partial``."""
    return out_dir.parent / f"{out_dir.name}.partial"


# Params that change how a run executes, not what it computes: a resume may change them.
RESUME_FREE = (
    "num_workers",
    "device",
    "compile",
    "max_bad_samples",
    "feature_cache",
    "allow_download",
    "grad_checkpointing",
)


def resume_key(p: TrainParams, data_sha256: str) -> dict[str, Any]:
    """What a checkpoint must have been made from for ``--resume`` to continue it."""
    params = {k: v for k, v in p.model_dump(mode="json").items() if k not in RESUME_FREE}
    return {"params": params, "data_sha256": data_sha256}


def key_differences(saved: dict[str, Any] | None, wanted: dict[str, Any]) -> list[str]:
    """The params and data that differ between two resume keys, as 'train.x: a -> b' lines."""
    if not saved:
        return ["no resume key (written by an older mmpipe)"]
    old, new = saved.get("params", {}), wanted["params"]
    out = [
        f"train.{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if saved.get("data_sha256") != wanted["data_sha256"]:
        out.append("data: the shard manifest differs (another data version)")
    return out


def start_or_resume(t: Trainer, work: Path, resume: bool) -> tuple[Progress, dict[str, Any] | None]:
    """Fresh: an empty work directory. Resume: its last.pt restored, if made from the same key."""
    last = work / LAST
    if t.d.main and not resume and last.is_file():
        log.warning(
            "%s: discarding the checkpoint of an interrupted run (--resume continues it)", work
        )
    if not resume:
        if t.d.main:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        barrier(t.d)
        return Progress(), None
    if not last.is_file():
        log.warning("%s not found: nothing to resume, starting from scratch", last)
        if t.d.main:
            work.mkdir(parents=True, exist_ok=True)
        return Progress(), None
    if t.d.main:
        remove_temps(work)  # a killed checkpoint write's; the project lock says nobody else writes
    state = read_checkpoint(last)
    differences = key_differences(state.get("resume_key"), t.meta["resume_key"])
    if differences:
        raise InputError(
            f"{last}: made with other params or data ({'; '.join(differences)}); --resume "
            "refuses to continue it. Run without --resume to train from scratch (discards it)."
        )
    return restore(t, state, last)


def interrupted(at: Progress, work: Path) -> signals.Interrupted:
    """The error of a run stopped by a signal after its checkpoint."""
    signum = signals.requested() or signal.SIGTERM
    return signals.Interrupted(
        f"train stopped by {signals.signal_name(signum)} at epoch {at.epoch + 1}, step {at.step}; "
        f"checkpoint in {work / LAST} (`mmpipe train --resume` continues it); models unchanged",
        signum,
    )


def install_model(work: Path, out_dir: Path, report: dict[str, Any]) -> None:
    """Switch the finished run's checkpoints + report in as ``out_dir``; drop the work dir."""
    with staged_dir(out_dir) as staging:
        for name in (BEST, LAST):
            if (work / name).is_file():
                link_or_copy(work / name, staging / name)
        write_json_atomic(staging / "train_report.json", report)
    fault_point("train:installed")
    shutil.rmtree(work, ignore_errors=True)


def train_loop(
    shard_dir: Path,
    work: Path,
    t: Trainer,
    at: Progress,
    rng: dict[str, Any] | None,
    max_steps: int | None,
    on_epoch_end: EpochCallback | None,
) -> dict[str, Any]:
    """Epochs until done, a signal or ``max_steps``; checkpoints into ``work``; the report.

    ``rng``: the RNG states of a resumed checkpoint, restored once its epoch's data is positioned.
    A signal stops the loop at the next optimiser-step boundary (before the next micro-batch), so
    the checkpoint is exactly resumable.
    """
    p, d, accum = t.p, t.d, t.p.grad_accum
    started, stopped_by = time.perf_counter(), None
    log.info(
        "training %s on %s (amp=%s, world=%d, micro-batch=%d, %d steps/epoch)",
        *(t.model.config, t.device, t.amp, d.world_size, t.micro_batch, t.steps_per_epoch),
    )
    if p.total_epochs() == 0 and not at.history:
        untrained_checkpoint(shard_dir, work, t, at)
    cached_accum = p.grad_cache and accum > 1
    pending: list[dict[str, Any]] = []  # grad_cache: this step's micro-batches so far
    while at.epoch < p.total_epochs() and stopped_by is None:
        if stage_at(t, at.epoch) != t.stage:
            enter_stage(t, stage_at(t, at.epoch))
        epoch_start = time.perf_counter()
        t.net.train()
        loader = train_batches(shard_dir, t, at)
        if rng is not None:
            set_rng_state(rng)
            rng = None
        desc, total = f"epoch {at.epoch + 1}/{p.total_epochs()}", t.steps_per_epoch * accum
        bar = tqdm(total=total, initial=at.batch_in_epoch, desc=desc, leave=False,
                   disable=not d.main or None)  # fmt: skip
        for batch, stopping in agreed_batches(loader, t):
            if stopping and at.batch_in_epoch % accum == 0:  # an optimiser-step boundary
                stopped_by = "signal"
                break
            if batch is None:  # stopped inside an accumulated step, with no batch to finish it
                stopped_by = "lost"
                break
            boundary = (at.batch_in_epoch + 1) % accum == 0
            if cached_accum:  # the step's micro-batches first, then one contrastive batch
                pending.append(batch)
                if boundary:
                    for parts in grad_cache_backward(t, pending):
                        add(at.sums, **parts, batches=1)
                    pending = []
            else:
                # DDP syncs gradients only on the micro-batch that ends an optimiser step
                with contextlib.nullcontext() if boundary or not d.enabled else t.net.no_sync():
                    loss, parts = compute_loss(t, batch)
                    t.scaler.scale(loss / accum).backward()
                add(at.sums, **parts, batches=1)
            at.batch_in_epoch += 1
            bar.update(1)
            if boundary:
                optimizer_step(t)
                at.step += 1
                fault_point("train:step")
                if max_steps is not None and at.step >= max_steps:
                    stopped_by = "max_steps"
                    break
        bar.close()
        if pending and stopped_by is None:  # the data ended inside a grad_cache step
            for parts in grad_cache_backward(t, pending):
                add(at.sums, **parts, batches=1)
            pending = []
        if stopped_by is not None:
            stop_checkpoint(t, at, work, stopped_by)
            break
        if at.batch_in_epoch % accum:  # leftover micro-batches of a short last step
            optimizer_step(t)
            at.step += 1
        row = end_epoch(shard_dir, work, t, at, time.perf_counter() - epoch_start)
        if on_epoch_end is not None and d.main:
            on_epoch_end(row["epoch"], dict(row))
    stopped_by = "signal" if stopped_by == "lost" else stopped_by
    return make_report(t, at, stopped_by, time.perf_counter() - started)


def untrained_checkpoint(shard_dir: Path, work: Path, t: Trainer, at: Progress) -> None:
    """train.epochs 0: the model as loaded (a pretrained dual encoder, zero-shot), validated
    once and saved as best.pt and last.pt."""
    row: dict[str, Any] = {"epoch": 0, "step": 0, "stage": t.stages[t.stage].name}
    if t.d.main:
        row.update(validate(shard_dir, t))
        at.history.append(row)
        at.best = selection_metric(row, t.p.task)[1]
        save_checkpoint(checkpoint_state(t, at, full=False), work / BEST)
        save_checkpoint(checkpoint_state(t, at), work / LAST)
    barrier(t.d)
    log.info("train.epochs=0: the model as loaded, not trained: %s",
             {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})  # fmt: skip


def stop_checkpoint(t: Trainer, at: Progress, work: Path, stopped_by: str) -> None:
    """Mid-epoch stop: last.pt records the position, ``--resume`` continues exactly there.

    "lost": the loader's workers died with the signal (a process-group SIGTERM) in the middle of
    an accumulated step; that position is not exactly resumable, so the last epoch's checkpoint
    stays.
    """
    if stopped_by == "lost":
        log.warning("stopped inside an accumulated step: keeping the last epoch's checkpoint")
        return
    if t.d.main:
        save_checkpoint(checkpoint_state(t, at), work / LAST)
        fault_point("train:checkpoint-saved")
    log.warning("stopped at step %d (epoch %d, micro-batch %d); resume with --resume",
                at.step, at.epoch, at.batch_in_epoch)  # fmt: skip


def end_epoch(
    shard_dir: Path, work: Path, t: Trainer, at: Progress, seconds: float
) -> dict[str, Any]:
    """Validate (rank 0), record the epoch, write last.pt and, if it improved, best.pt."""
    s, nb = at.sums, max(at.sums.get("batches", 0.0), 1.0)
    row: dict[str, Any] = {
        "epoch": at.epoch + 1, "step": at.step,
        "train_loss": s.get("loss", 0.0) / nb, "train_contrastive": s.get("contrastive", 0.0) / nb,
        "train_task": s.get("task", 0.0) / nb, "lr": t.scheduler.get_last_lr()[0],
        "train_labelled_pairs": s.get("labelled", 0.0), "stage": t.stages[t.stage].name,
        "temperature": 1.0 / float(t.model.scale().detach()),
    }  # fmt: skip
    if "itm" in s:
        row["train_itm"] = s["itm"] / nb
    if t.d.main:
        row.update(validate(shard_dir, t))
    # the history goes into checkpoints and train_report.json: versioned outputs hold no timings
    # (the same run twice must give the same bytes); they go to the log and MLflow only
    at.history.append(dict(row))
    row.update(samples_per_s=s.get("samples", 0.0) / max(seconds, 1e-9), epoch_seconds=seconds)
    at.epoch, at.batch_in_epoch, at.sums = at.epoch + 1, 0, {}
    if t.d.main:
        metric = selection_metric(row, t.p.task)[1]
        improved = metric is not None and (at.best is None or metric > at.best)
        if improved:
            at.best = metric
        if improved or not (work / BEST).exists():
            save_checkpoint(checkpoint_state(t, at, full=False), work / BEST)
        save_checkpoint(checkpoint_state(t, at), work / LAST)  # last: resume never lacks best
        fault_point("train:checkpoint-saved")
    barrier(t.d)  # other ranks wait for rank 0's validation + checkpoint
    rounded = {k: round(v, 4) for k, v in row.items() if isinstance(v, float)}
    log.info("epoch %d: %s", row["epoch"], rounded)
    return row


def make_report(t: Trainer, at: Progress, stopped_by: str | None, seconds: float) -> dict[str, Any]:
    """The stage report; ``stopped_by``: None (completed), "signal" or "max_steps".

    ``seconds`` is returned for the caller's log and MLflow; the installed train_report.json
    leaves it out (versioned outputs hold no timings)."""
    last = at.history[-1] if at.history else {}
    return {
        "epochs_completed": at.epoch, "steps": at.step, "interrupted": stopped_by is not None,
        "stopped_by": stopped_by, "history": at.history, "best_metric": at.best,
        "selection_metric": selection_metric(last, t.p.task)[0], "final": last,
        "task": t.p.task, "task_loss": t.task_loss, "stages": stage_reports(t), "init": t.init,
        "classes": t.meta["classes"], "num_classes": t.meta["num_classes"],
        "model": t.model.config, "device": str(t.device),
        "amp": str(t.amp).replace("torch.", "") if t.amp else "off",
        "world_size": t.d.world_size, "checkpoint": LAST, "best_checkpoint": BEST,
        "seconds": round(seconds, 3),
    }  # fmt: skip


def stage_reports(t: Trainer) -> list[dict[str, Any]]:
    """Each stage as run: its settings, steps and warm-up (train_report.json's ``stages``)."""
    rows = []
    for s in t.stages:
        steps = t.steps_per_epoch * s.epochs
        rows.append({**s.model_dump(mode="json"), "steps": steps,
                     "warmup_steps": warmup_steps(t.p, steps), "freezing": describe_freezing(s)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- one step


def compute_loss(t: Trainer, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Multitask loss of one micro-batch over the GLOBAL batch, and its logged parts."""
    p, d, stage = t.p, t.d, t.stages[t.stage]
    target = batch_targets(batch, p.task).to(t.device)
    groups_local = group_ids(batch["image_id"]).to(t.device)
    with t.autocast():
        out = t.net(*model_inputs(t, batch))
    target = out.get("caption_target", target)  # captioning: the caption's next words
    img = all_gather_grad(out["image_emb"].float(), d)  # (N, D), N = global micro-batch
    txt = all_gather_grad(out["text_emb"].float(), d)  # (N, D)
    groups = all_gather_grad(groups_local, d)  # (N,)
    contrastive = contrastive_objective(out, img, txt, groups)
    if "audio_emb" in out:  # the third modality: + image-audio and text-audio InfoNCE
        aud = all_gather_grad(out["audio_emb"].float(), d)
        mask = all_gather_grad(out["audio_mask"].to(torch.uint8), d).bool()  # gloo: no bool
        contrastive = contrastive + audio_info_nce(img, txt, aud, mask, out["logit_scale"], groups)
    t_sum, n = task_loss_sum(out["logits"], target, p.task)
    t_global, n_global = all_reduce_sum([float(t_sum.detach()), float(n)], d, t.device)
    # DDP averages gradients over ranks: scale the local sum by W / n_global so the average
    # is the global mean task loss, exactly as in one process
    task = t_sum * (d.world_size / max(n_global, 1.0))
    w_con, w_task = stage.lambda_contrastive or 0.0, stage.lambda_task or 0.0
    loss = w_con * contrastive + w_task * task
    parts = {
        "loss": w_con * float(contrastive.detach()) + w_task * t_global / max(n_global, 1.0),
        "contrastive": float(contrastive.detach()),
        "task": t_global / max(n_global, 1.0),
        "samples": float(len(img)),
        # captioning's n counts target tokens; the report counts the pairs that trained
        "labelled": float(len(img)) if task_spec(p.task).captions else n_global,
    }
    if "itm_logits" in out:
        itm = itm_loss(out["itm_logits"], out["itm_labels"])
        loss = loss + p.itm_weight * itm
        parts["itm"] = float(itm.detach())
        parts["loss"] += p.itm_weight * parts["itm"]
    return loss, parts


def grad_cache_backward(t: Trainer, batches: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One optimiser step's backward with feature-cached accumulation (GradCache, Gao et al.
    2021; open_clip's accum_freq): the contrastive loss over all the step's micro-batches at once.

    Pass 1 embeds every micro-batch without gradients, computes the contrastive loss of the
    whole step's batch and its gradient with respect to each embedding (and the temperature);
    pass 2 re-runs each micro-batch with gradients and back-propagates those cached embedding
    gradients, plus its task loss (as the plain loop would). Memory is one micro-batch's
    activations; the contrastive batch is batch_size. Returns each micro-batch's logged parts.
    """
    p, d, stage = t.p, t.d, t.stages[t.stage]
    w_con, w_task = stage.lambda_contrastive or 0.0, stage.lambda_task or 0.0
    with torch.no_grad(), t.autocast():
        first = [t.net(*model_inputs(t, b)) for b in batches]
    img = torch.cat([o["image_emb"].float() for o in first]).requires_grad_(True)  # (A*b, D)
    txt = torch.cat([o["text_emb"].float() for o in first]).requires_grad_(True)
    groups = torch.cat([group_ids(b["image_id"]) for b in batches]).to(t.device)
    scale = {"logit_scale": t.model.scale()}
    if t.model.contrastive_loss == "sigmoid":
        scale["logit_bias"] = t.model.logit_bias
    gathered = (all_gather_grad(img, d), all_gather_grad(txt, d), all_gather_grad(groups, d))
    con = contrastive_objective(scale, *gathered)
    t.scaler.scale(w_con * con).backward()  # grads of img, txt (cached) and the temperature
    img_grad, txt_grad = (
        img.grad.split([len(o["image_emb"]) for o in first]),
        txt.grad.split([len(o["text_emb"]) for o in first]),
    )
    rows = []
    for j, batch in enumerate(batches):
        last = j == len(batches) - 1
        with contextlib.nullcontext() if last or not d.enabled else t.net.no_sync():
            with t.autocast():
                out = t.net(*model_inputs(t, batch))
            target = out.get("caption_target", batch_targets(batch, p.task).to(t.device))
            t_sum, n = task_loss_sum(out["logits"], target, p.task)
            t_global, n_global = all_reduce_sum([float(t_sum.detach()), float(n)], d, t.device)
            task = t_sum * (d.world_size / max(n_global, 1.0))
            # the cached gradients flow into this micro-batch's embeddings; the scale's zero
            # term keeps every parameter in DDP's graph
            surrogate = (out["image_emb"].float() * img_grad[j]).sum() + (
                out["text_emb"].float() * txt_grad[j]
            ).sum()
            loss = (
                surrogate + t.scaler.scale(w_task * task / len(batches)) + 0.0 * out["logit_scale"]
            )
            loss.backward()
        rows.append({
            "loss": w_con * float(con.detach()) + w_task * t_global / max(n_global, 1.0),
            "contrastive": float(con.detach()), "task": t_global / max(n_global, 1.0),
            "samples": float(len(out["image_emb"]) * d.world_size), "labelled": n_global,
        })  # fmt: skip
    return rows


def model_inputs(t: Trainer, batch: dict[str, Any]) -> tuple[Any, ...]:
    """The forward's positional arguments for a loader batch: images (None when the frozen-feature
    cache stands in: then ``image_cache``), texts, the audio/ITM values, and the cached image
    and text features (None where a tower is not cached)."""
    extra = audio_inputs(batch, t.device)
    if t.p.itm_weight > 0:  # ITM negatives come from this rank's micro-batch
        extra["itm_groups"] = group_ids(batch["image_id"]).to(t.device)
    images = None
    if t.features is not None:
        cache = t.features.lookup(list(batch["sample_key"]), t.device)  # by image sample
    else:
        images, cache = batch["image"].to(t.device, non_blocking=True), None
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    texts = None
    if t.text_features is not None:
        texts = t.text_features.lookup(list(batch["key"]), t.device)
    return (images, list(batch["text"]), extra.get("audio"), extra.get("audio_mask"),
            extra.get("itm_groups"), None, cache, texts)  # fmt: skip


def optimizer_step(t: Trainer) -> None:
    """Unscale, clip, step, schedule, and clamp the temperature like CLIP."""
    if t.p.grad_clip > 0:
        t.scaler.unscale_(t.optimizer)
        params = [q for q in t.model.parameters() if q.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, t.p.grad_clip)
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    t.scheduler.step()
    with torch.no_grad():
        t.model.logit_scale.clamp_(0, math.log(100.0))


def train_batches(shard_dir: Path, t: Trainer, at: Progress) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches of the current epoch, after those already consumed."""
    p, d = t.p, t.d
    loader = create_dataloader(
        shard_dir, "train", t.micro_batch,
        shuffle_buffer=p.shuffle_buffer, num_workers=p.num_workers,
        augment=list(p.online_augment), seed=p.seed, epoch=at.epoch,
        rank=d.rank, world_size=d.world_size,
        drop_last=d.enabled,  # all_gather needs equal micro-batches on every rank
        skip_batches=at.batch_in_epoch,  # resume inside an epoch
        max_bad_samples=p.max_bad_samples,
        images=t.features is None,  # cached features stand in for the pixels: none decoded
        pin_memory=t.device.type == "cuda",
        captions="one",  # a caption per image and epoch, seeded: all of them over the epochs
    )  # fmt: skip
    return iter(loader)


def agreed_batches(
    loader: Iterator[dict[str, Any]], t: Trainer
) -> Iterator[tuple[dict[str, Any] | None, bool]]:
    """(batch, stop requested) until the data ends; under DDP every rank agrees on both.

    A stop comes from a signal (``mmpipe.signals``). The batch is None when a stop finds the data
    at its end, or when the signal also killed the loader's workers (a process-group SIGTERM).
    """
    while True:
        # the DataLoader draws its base seed from the global RNG (lazily, at the first next()):
        # keep loading out of the training stream so that a resumed run, which builds its loader
        # at another point of that stream, replays the same dropout masks
        try:
            with torch.random.fork_rng(devices=[]):
                batch = next(loader, None)
        except RuntimeError:
            if signals.requested() is None:
                raise
            batch = None  # "DataLoader worker ... is killed by signal": a stop, not a crash
        stopping = signals.requested() is not None
        if t.d.enabled:
            have, stops = all_reduce_sum([float(batch is not None), float(stopping)], t.d, t.device)
            # an uneven split must not leave one rank waiting in a collective (webdataset#188)
            batch, stopping = (batch if have == t.d.world_size else None), stops > 0
        if batch is None:
            if stopping:
                yield None, True
            return
        yield batch, stopping


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(shard_dir: Path, t: Trainer) -> dict[str, float]:
    """Val loss parts, the task's metric on labelled rows (``val_metrics``), in-batch t->i R@1."""
    if not t.val_count:
        return {}
    t.model.eval()
    sums: dict[str, float] = {}
    targets, logits = [], []  # labelled rows only
    ranking = ValRetrieval()
    loader = create_dataloader(shard_dir, "val", t.p.batch_size, num_workers=t.p.num_workers,
                               images=t.features is None)  # fmt: skip
    itm, spec = val_itm_inputs(t), task_spec(t.p.task)
    with torch.random.fork_rng(devices=[]):  # validation must not move the training RNG
        for batch in loader:
            y = batch_targets(batch, t.p.task).to(t.device)
            with t.autocast():
                args = model_inputs(t, batch)
                out = t.model(*args[:5], itm.get("itm_generator"), *args[6:])
            img, txt = out["image_emb"].float(), out["text_emb"].float()  # (B, D) each
            groups = group_ids(batch["image_id"]).to(t.device)
            ranking.add(img, txt, batch["image_id"])
            con = contrastive_objective(out, img, txt, groups)
            if "audio_emb" in out:
                aud, mask = out["audio_emb"].float(), out["audio_mask"]
                con = con + audio_info_nce(img, txt, aud, mask, out["logit_scale"], groups)
            y = out.get("caption_target", y)
            t_sum, n = task_loss_sum(out["logits"], y, t.p.task)
            hit = groups[(txt @ img.T).argmax(dim=1)] == groups  # (B,): caption finds its image
            if spec.val_metrics:  # none for captioning: its val metric is the token loss
                rows = labelled_rows(y, t.p.task)
                z = out["logits"].float()[rows]  # (L, K)
                y = multi_hot(y[rows], z.shape[1]) if spec.target == "labels" else y[rows]
                targets.append(y)
                logits.append(z)
            add(sums, batches=1, con=float(con), task_sum=float(t_sum), labelled=n,
                r1=float(hit.sum()), rows=len(batch["label"]))  # fmt: skip
            if "itm_logits" in out:
                add(sums, itm=float(itm_loss(out["itm_logits"], out["itm_labels"])))
    if not sums:
        return {}
    if not targets:  # captioning: loss parts only; best.pt is picked on -val_loss
        return {**val_metrics(sums, torch.empty(0), torch.empty(0), t), **ranking.metrics()}
    return {**val_metrics(sums, torch.cat(targets), torch.cat(logits), t), **ranking.metrics()}


class ValRetrieval:
    """R@1 both ways over the val split (its first ``VAL_RETRIEVAL_TEXTS`` captions and their
    images), the protocol of evaluate: each caption against every image, each image against
    every caption (a hit for any of its own). What picks best.pt without labels."""

    def __init__(self) -> None:
        self.images: dict[str, torch.Tensor] = {}  # image_id -> (D,), in first-seen order
        self.index: dict[str, int] = {}
        self.texts: list[torch.Tensor] = []
        self.owner: list[int] = []  # caption -> its image's row

    def add(self, img: torch.Tensor, txt: torch.Tensor, image_ids: list[str]) -> None:
        """A val batch's embeddings (B, D) each, and its rows' image ids."""
        for i, image_id in enumerate(image_ids):
            if len(self.owner) >= VAL_RETRIEVAL_TEXTS:
                return
            if image_id not in self.index:
                self.index[image_id] = len(self.images)
                self.images[image_id] = img[i].detach().float().cpu()
            self.owner.append(self.index[image_id])
            self.texts.append(txt[i].detach().float().cpu())

    def metrics(self) -> dict[str, float]:
        """val_i2t_r1, val_t2i_r1 and their mean val_mean_r1 (what picks best.pt unlabelled)."""
        if len(self.images) < 2:
            return {}
        sim = torch.stack(list(self.images.values())) @ torch.stack(self.texts).T  # (I, T)
        i2t = M.recall_at_k_i2t(sim, self.owner, [1])[1]
        t2i = M.recall_at_k_t2i(sim, self.owner, [1])[1]
        return {"val_i2t_r1": i2t, "val_t2i_r1": t2i, "val_mean_r1": 0.5 * (i2t + t2i)}


VAL_RETRIEVAL_TEXTS = 5000  # keeps the (images x captions) similarity small on large val splits


def val_itm_inputs(t: Trainer) -> dict[str, Any]:
    """The forward's ITM arguments for validation: the same negatives every epoch (a
    generator seeded by train.seed), or {} when the model is trained without ITM."""
    if t.p.itm_weight <= 0:
        return {}
    return {"itm_generator": torch.Generator().manual_seed(t.p.seed)}


def val_metrics(
    sums: dict[str, float], targets: torch.Tensor, logits: torch.Tensor, t: Trainer
) -> dict[str, float]:
    """Validation metrics from the pass's sums and its labelled rows' targets and logits (the
    multi-hot form for multilabel): the loss parts, and the task's ``TaskSpec.val_metrics``."""
    n, lab = sums["batches"], sums.get("labelled", 0.0)
    task = sums.get("task_sum", 0.0) / lab if lab else 0.0
    stage = t.stages[t.stage]
    out = {
        "val_contrastive": sums["con"] / n,
        "val_task": task,
        "val_loss": (stage.lambda_contrastive or 0.0) * sums["con"] / n
        + (stage.lambda_task or 0.0) * task,
        "val_r1_in_batch": sums["r1"] / sums["rows"],
    }
    if "itm" in sums:  # ITM's share of the val loss, which picks best.pt without labels
        out["val_itm"] = sums["itm"] / n
        out["val_loss"] += t.p.itm_weight * out["val_itm"]
    spec = task_spec(t.p.task)
    if not lab or not spec.val_metrics:
        return out
    pred = predict_labels(logits, t.p.task)
    return out | {name: VAL_METRICS[name](targets, pred, logits) for name in spec.val_metrics}


# a validation metric's name -> its value from the labelled rows' targets, labels and logits
VAL_METRICS = {
    "val_accuracy": lambda y, pred, z: M.accuracy(y, pred),
    "val_macro_f1": lambda y, pred, z: M.macro_f1(
        y, pred, max(z.shape[1], 2, int(max(y.max(), pred.max())) + 1)
    ),
    "val_micro_f1": lambda y, pred, z: M.multilabel_f1(y, pred)["micro_f1"],
    "val_map": lambda y, pred, z: M.mean_average_precision(y, torch.sigmoid(z)),
    "val_mae": lambda y, pred, z: M.mae(y, pred),
    "val_rmse": lambda y, pred, z: M.rmse(y, pred),
}


def selection_metric(metrics: dict[str, float], task: str) -> tuple[str, float | None]:
    """(name, value) of what picks best.pt, higher is better: the task's validation metric
    (``TaskSpec.selection``, negated when lower is better); without labelled val pairs, val
    retrieval (val_mean_r1: a contrastive run's val loss can rise while its retrieval still
    improves), except for captioning (its task loss) and ITM runs (the val loss holds ITM's
    share), else minus the val loss."""
    spec = task_spec(task)
    name, key = spec.selection, spec.selection_key()
    if name is not None and key is not None and name in metrics:
        return key, metrics[name] if spec.selection_greater else -metrics[name]
    if "val_mean_r1" in metrics and not spec.captions and "val_itm" not in metrics:
        return "val_mean_r1", metrics["val_mean_r1"]
    return "-val_loss", -metrics["val_loss"] if "val_loss" in metrics else None


def add(sums: dict[str, float], **values: float) -> None:
    """Accumulate named sums."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + float(v)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(t: Trainer, at: Progress, full: bool = True) -> dict[str, Any]:
    """Plain dict of tensors and primitives (mmpipe.checkpoint's format)."""
    state: dict[str, Any] = {
        "model": t.model.state_dict(), "step": at.step, "epoch": at.epoch,
        "batch_in_epoch": at.batch_in_epoch, "best_metric": at.best, "history": at.history,
        "stage": t.stage, **t.meta,
    }  # fmt: skip
    if full:
        state.update(
            optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
            scaler=t.scaler.state_dict(), rng=rng_state(), epoch_sums=dict(at.sums),
        )  # fmt: skip
    return state


def restore(t: Trainer, state: dict[str, Any], path: Path) -> tuple[Progress, dict[str, Any]]:
    """Load a last.pt into the trainer; (where it stood, its RNG states to restore later)."""
    try:
        t.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: checkpoint does not match train params ({exc})") from None
    if int(state.get("stage", 0)) != t.stage:  # the optimizer saved is that stage's
        enter_stage(t, int(state.get("stage", 0)))
    t.optimizer.load_state_dict(state["optimizer"])
    t.scheduler.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    at = Progress(
        step=int(state["step"]), epoch=int(state["epoch"]),
        batch_in_epoch=int(state["batch_in_epoch"]), best=state.get("best_metric"),
        history=list(state.get("history", [])), sums=dict(state.get("epoch_sums", {})),
    )  # fmt: skip
    log.info("resumed from %s at epoch %d, micro-batch %d, step %d",
             path, at.epoch, at.batch_in_epoch, at.step)  # fmt: skip
    return at, state["rng"]


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists (loadable with weights_only=True).

    Not Python's global ``random``: training draws from its own seeded ``random.Random``
    instances (mmpipe.data), while other threads of the process (Prefect's, in the flow) draw
    from the global one at moments that depend on the machine's load, so saving it made the
    same training's last.pt differ in bytes between the flow and `dvc repro`.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *(np_state[2:4]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "python" in state:  # checkpoints written before it was left out
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- settings


def resolve_device(p: TrainParams, d: Dist) -> torch.device:
    """cuda if asked/available (cuda:LOCAL_RANK under DDP), else cpu."""
    if p.device == "cuda" and not torch.cuda.is_available():
        raise InputError("train.device=cuda but no CUDA device is available")
    if p.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", d.local_rank)


def resolve_amp(p: TrainParams, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: auto = bf16 on capable CUDA, off on CPU; fp16 only on CUDA."""
    if p.amp == "auto":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else None
    if p.amp == "fp16" and device.type != "cuda":
        raise InputError("train.amp=fp16 needs CUDA (GradScaler); use amp=bf16 or off on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[p.amp]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


ENCODERS = ("image_encoder.", "text_encoder.", "audio_encoder.")


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float | None = None, encoder_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices/kernels/embeddings; not norms, biases or the logit scale.
    With ``encoder_scale`` != 1 the encoders' parameters get their own groups at lr x scale
    (small for pretrained towers, larger for the new projections and heads)."""
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    encoder = [(n, q) for n, q in trainable if n.startswith(ENCODERS)] if encoder_scale != 1 else []
    rest = [(n, q) for n, q in trainable if not (encoder_scale != 1 and n.startswith(ENCODERS))]
    groups = [
        {"params": [q for n, q in rest if q.ndim >= 2], "weight_decay": weight_decay},
        {"params": [q for n, q in rest if q.ndim < 2], "weight_decay": 0.0},
    ]
    if encoder and lr is not None:
        groups += [
            {"params": [q for n, q in encoder if q.ndim >= 2], "weight_decay": weight_decay,
             "lr": lr * encoder_scale},
            {"params": [q for n, q in encoder if q.ndim < 2], "weight_decay": 0.0,
             "lr": lr * encoder_scale},
        ]  # fmt: skip
    return groups if len(groups) == 2 else [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batch_size(p: TrainParams, d: Dist) -> int:
    """Per-rank micro-batch: the global batch split over ranks and accumulation steps."""
    parts = d.world_size * p.grad_accum
    if p.batch_size % parts:
        raise InputError(
            f"train.batch_size={p.batch_size} is not divisible by world_size ({d.world_size}) "
            f"x grad_accum ({p.grad_accum})"
        )
    return p.batch_size // parts


def group_ids(image_ids: list[str]) -> torch.Tensor:
    """int64 id per image (image_id is hex sha256[:16]); pairs sharing an image are positives."""
    out = []
    for s in image_ids:
        try:
            out.append(int(s[:15], 16))
        except ValueError:
            out.append(zlib.crc32(s.encode("utf-8")))
    return torch.tensor(out, dtype=torch.long)
