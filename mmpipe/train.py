"""Stage `train`: the dual encoder + fusion classifier on the WebDataset shards.

    run_train(shard_dir, p, out_dir)   -> last.pt, best.pt, train_report.json
    load_model(checkpoint)             -> (model, info)

Single process or DDP under ``torchrun`` (env WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on
CUDA). ``p.batch_size`` is the global batch of one optimiser step: each rank loads
batch_size / (world_size * grad_accum) samples per micro-batch. The contrastive loss is computed
over the gathered global batch (all_gather WITH gradient), and the task loss is normalised by
the global labelled count, so DDP computes the same gradient as one process would.

Exact resume: checkpoints hold model/optimizer/scheduler/scaler state, the data position
(epoch, micro-batch) and the RNG states. The loader order is a function of (seed, epoch), so
resuming rebuilds the epoch's loader, skips the consumed micro-batches and restores the RNGs:
on CPU with num_workers=0 the resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
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
import torch.distributed as dist
from tqdm import tqdm

from mmpipe.config import TrackingParams, TrainParams
from mmpipe.errors import InputError
from mmpipe.io import atomic_path, read_json, write_json_atomic
from mmpipe.model import MultimodalModel, create_model, info_nce, predict_labels, task_loss_sum

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]


# ----------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we called init_process_group, so we tear it down

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only rank 0 writes checkpoints, reports and logs."""
        return self.rank == 0


def init_distributed(device_pref: str) -> Dist:
    """Read torchrun's env; init the process group (nccl on CUDA, gloo on CPU) if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = device_pref != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(d.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        d.owns_group = True
    return d


def all_gather_grad(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate ``x`` (b, ...) of every rank -> (W*b, ...); gradients flow back to each rank."""
    if not d.enabled:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few scalars over ranks (no gradient)."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- setup


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


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *(np_state[2:4]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices/kernels/embeddings; not norms, biases or the logit scale."""
    trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    decay = [q for n, q in trainable if q.ndim >= 2]
    no_decay = [q for n, q in trainable if q.ndim < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def read_manifest(shard_dir: Path) -> dict[str, Any]:
    """The shard manifest, or an InputError naming what is missing."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{path} not found: run `mmpipe shard` first")
    manifest = read_json(path)
    count = manifest.get("splits", {}).get("train", {}).get("count", 0)
    if not count:
        raise InputError(f"{path}: the train split is empty; nothing to train on")
    return manifest


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


class StopFlag:
    """SIGTERM sets the flag; the loop saves at the next step boundary and returns."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def handler(self, signum: int, frame: Any) -> None:
        """Signal handler: only set a flag (saving inside a handler could corrupt state)."""
        log.warning("signal %d: will checkpoint at the next step boundary and stop", signum)
        self.requested = True

    def __enter__(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self.handler)
        except ValueError:  # not the main thread (e.g. a Prefect worker thread): no handler
            log.info("not in the main thread: SIGTERM checkpointing disabled")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- state


@dataclass
class Loop:
    """Everything the training loop mutates, plus its fixed settings."""

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
    total_steps: int
    meta: dict[str, Any]  # classes, num_classes, image_size, ...: copied into every checkpoint
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    sums: dict[str, float] = field(default_factory=dict)  # running sums of the current epoch
    best: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    pending_rng: dict[str, Any] | None = None  # restored once the resumed epoch is positioned

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16/fp16 autocast, or nothing."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)


def build_loop(shard_dir: Path, p: TrainParams, d: Dist, manifest: dict[str, Any]) -> Loop:
    """Model, optimiser, schedule, AMP and (if distributed) the DDP wrapper, all seeded."""
    device, classes = resolve_device(p, d), list(manifest.get("classes") or [])
    if p.task == "binary" and len(classes) > 2:
        raise InputError(f"train.task=binary but the manifest lists {len(classes)} classes")
    amp = resolve_amp(p, device)
    seed_everything(p.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    model = create_model(p, len(classes)).to(device)
    net: torch.nn.Module = model
    if d.enabled:
        if device.type == "cuda" and not p.freeze_image:
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # EfficientNet's BN
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    if p.compile and device.type == "cuda":
        net = torch.compile(net)
    elif p.compile:
        log.warning("train.compile is ignored on CPU")
    micro = micro_batch_size(p, d)
    per_rank = manifest["splits"]["train"]["count"] // d.world_size
    batches = per_rank // micro if d.enabled else math.ceil(per_rank / micro)
    steps_per_epoch = max(1, math.ceil(batches / p.grad_accum))
    total = steps_per_epoch * p.epochs
    optimizer = torch.optim.AdamW(param_groups(model, p.weight_decay), lr=p.lr, betas=(0.9, 0.98))
    schedule = partial(warmup_cosine, warmup=p.warmup_steps, total=total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    meta = {
        "classes": classes, "num_classes": len(classes), "image_size": manifest.get("image_size"),
        "task": p.task, "params": p.model_dump(mode="json"), "model_config": model.config,
        "params_hash": manifest.get("params_hash"),
    }
    return Loop(p, d, device, amp, model, net, optimizer, scheduler, scaler, micro,
                steps_per_epoch, total, meta)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_state(loop: Loop, full: bool = True) -> dict[str, Any]:
    """Plain dict of tensors and primitives (torch.load(weights_only=True) reads it)."""
    state: dict[str, Any] = {
        "model": loop.model.state_dict(), "step": loop.step, "epoch": loop.epoch,
        "batch_in_epoch": loop.batch_in_epoch, "best_metric": loop.best,
        "history": loop.history, **loop.meta,
    }
    if full:
        state.update(
            optimizer=loop.optimizer.state_dict(), scheduler=loop.scheduler.state_dict(),
            scaler=loop.scaler.state_dict(), rng=rng_state(), epoch_sums=dict(loop.sums),
        )
    return state


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save through a temp file renamed over ``path`` (never a half-written checkpoint)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with user-facing errors."""
    if not Path(path).is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not ours"
        raise InputError(f"{path}: not a loadable mmpipe checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state or "params" not in state:
        raise InputError(f"{path}: not an mmpipe checkpoint (no 'model'/'params' entries)")
    return state


def restore(loop: Loop, state: dict[str, Any], path: Path) -> None:
    """Load a last.pt into the loop; RNG states are restored later, once data is positioned."""
    try:
        loop.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: checkpoint does not match train params ({exc})") from None
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.step, loop.epoch = int(state["step"]), int(state["epoch"])
    loop.batch_in_epoch, loop.best = int(state["batch_in_epoch"]), state.get("best_metric")
    loop.history, loop.sums = list(state.get("history", [])), dict(state.get("epoch_sums", {}))
    loop.pending_rng = state["rng"]
    log.info("resumed from %s at epoch %d, micro-batch %d, step %d",
             path, loop.epoch, loop.batch_in_epoch, loop.step)


def load_model(checkpoint_path: str | Path) -> tuple[MultimodalModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint's params + weights; (model in eval mode, info)."""
    path = Path(checkpoint_path)
    state = read_checkpoint(path)
    p = TrainParams.model_validate(state["params"])
    model = create_model(p, int(state.get("num_classes", 0)))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not match the stored params ({exc})") from None
    skip = {"model", "optimizer", "scheduler", "scaler", "rng", "epoch_sums"}
    return model.eval(), {k: v for k, v in state.items() if k not in skip}


# ----------------------------------------------------------------------------- steps


def compute_loss(loop: Loop, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Multitask loss of one micro-batch over the GLOBAL batch, and its logged parts."""
    p, d = loop.p, loop.d
    images = batch["image"].to(loop.device, non_blocking=True)
    labels = batch["label"].to(loop.device)
    with loop.autocast():
        out = loop.net(images, list(batch["text"]))
    img = all_gather_grad(out["image_emb"].float(), d)  # (N, D), N = global micro-batch
    txt = all_gather_grad(out["text_emb"].float(), d)  # (N, D)
    groups = all_gather_grad(group_ids(batch["image_id"]).to(loop.device), d)  # (N,)
    contrastive = info_nce(img, txt, out["logit_scale"], groups)
    t_sum, n = task_loss_sum(out["logits"], labels, p.task)
    t_global, n_global = all_reduce_sum([float(t_sum.detach()), float(n)], d, loop.device)
    # DDP averages gradients over ranks: scale the local sum by W / n_global so the average
    # is the global mean task loss, exactly as in one process
    task = t_sum * (d.world_size / max(n_global, 1.0))
    loss = contrastive + p.lambda_task * task
    parts = {
        "loss": float(contrastive.detach()) + p.lambda_task * t_global / max(n_global, 1.0),
        "contrastive": float(contrastive.detach()),
        "task": t_global / max(n_global, 1.0),
        "samples": float(len(img)),
    }
    return loss, parts


def optimizer_step(loop: Loop) -> None:
    """Unscale, clip, step, schedule, and clamp the temperature like CLIP."""
    if loop.p.grad_clip > 0:
        loop.scaler.unscale_(loop.optimizer)
        params = [q for q in loop.model.parameters() if q.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, loop.p.grad_clip)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.optimizer.zero_grad(set_to_none=True)
    loop.scheduler.step()
    loop.step += 1
    with torch.no_grad():
        loop.model.logit_scale.clamp_(0, math.log(100.0))


def make_loader(shard_dir: Path, loop: Loop, split: str, train: bool) -> Iterator[dict[str, Any]]:
    """A batch iterator through mmpipe.data (the only reader of shards)."""
    from mmpipe.data import create_dataloader

    p, d = loop.p, loop.d
    loader = create_dataloader(
        shard_dir, split, loop.micro_batch if train else p.batch_size,
        shuffle_buffer=p.shuffle_buffer if train else 0,
        num_workers=p.num_workers,
        augment=list(p.online_augment) if train else [],
        seed=p.seed, epoch=loop.epoch,
        rank=d.rank if train else 0, world_size=d.world_size if train else 1,
        drop_last=train and d.enabled,  # all_gather needs equal micro-batches on every rank
        skip_batches=loop.batch_in_epoch if train else 0,  # resume inside an epoch
    )
    return iter(loader)


def next_batch(it: Iterator[dict[str, Any]], loop: Loop, stop: StopFlag) -> tuple[Any, bool]:
    """(batch or None, stop requested); under DDP every rank agrees on both."""
    # the DataLoader draws its base seed from the global RNG (lazily, at the first next()):
    # keep loading out of the training stream so that a resumed run, which builds its loader
    # at another point of that stream, replays the same dropout masks
    with torch.random.fork_rng(devices=[]):
        batch = next(it, None)
    if not loop.d.enabled:
        return batch, stop.requested
    have, stopping = all_reduce_sum(
        [float(batch is not None), float(stop.requested)], loop.d, loop.device
    )
    # an uneven split must not leave one rank waiting in a collective (webdataset#188)
    return (batch if have == loop.d.world_size else None), stopping > 0


def train_epoch(shard_dir: Path, loop: Loop, stop: StopFlag, max_steps: int | None) -> bool:
    """One (possibly resumed) epoch; returns True if training must stop now (signal/max_steps)."""
    loop.net.train()
    it = make_loader(shard_dir, loop, "train", train=True)
    if loop.pending_rng is not None:
        set_rng_state(loop.pending_rng)
        loop.pending_rng = None
    accum = loop.p.grad_accum
    bar = tqdm(total=loop.steps_per_epoch * accum, initial=loop.batch_in_epoch,
               desc=f"epoch {loop.epoch + 1}/{loop.p.epochs}", disable=not loop.d.main or None,
               leave=False)
    while True:
        batch, stopping = next_batch(it, loop, stop)
        if batch is None:
            break
        boundary = (loop.batch_in_epoch + 1) % accum == 0
        sync = boundary or not loop.d.enabled
        with contextlib.nullcontext() if sync else loop.net.no_sync():
            loss, parts = compute_loss(loop, batch)
            loop.scaler.scale(loss / accum).backward()
        for k, v in parts.items():
            loop.sums[k] = loop.sums.get(k, 0.0) + v
        loop.sums["batches"] = loop.sums.get("batches", 0.0) + 1
        loop.batch_in_epoch += 1
        bar.update(1)
        if boundary:
            optimizer_step(loop)
            if stopping or (max_steps is not None and loop.step >= max_steps):
                bar.close()
                return True
    bar.close()
    if loop.batch_in_epoch % accum:  # leftover micro-batches of a short last step
        optimizer_step(loop)
    return False


@torch.no_grad()
def validate(shard_dir: Path, loop: Loop) -> dict[str, float]:
    """Val loss parts, accuracy (labelled rows) and in-batch text->image R@1 on rank 0."""
    manifest_val = loop.meta.get("val_count", 0)
    if not manifest_val:
        return {}
    model, p = loop.model, loop.p
    model.eval()
    sums: dict[str, float] = {}
    with torch.random.fork_rng(devices=[]):  # validation must not move the training RNG
        for batch in make_loader(shard_dir, loop, "val", train=False):
            images = batch["image"].to(loop.device)
            labels = batch["label"].to(loop.device)
            with loop.autocast():
                out = model(images, list(batch["text"]))
            groups = group_ids(batch["image_id"]).to(loop.device)
            con = info_nce(out["image_emb"].float(), out["text_emb"].float(), out["logit_scale"], groups)
            t_sum, n = task_loss_sum(out["logits"], labels, p.task)
            sim = out["text_emb"].float() @ out["image_emb"].float().T  # (B, B)
            hit = groups[sim.argmax(dim=1)] == groups
            acc_batch(sums, out["logits"].float(), labels, p.task)
            add(sums, batches=1, con=float(con), task_sum=float(t_sum), labelled=n,
                r1=float(hit.sum()), rows=len(labels))
    return val_metrics(sums, p)


def add(sums: dict[str, float], **values: float) -> None:
    """Accumulate named sums."""
    for k, v in values.items():
        sums[k] = sums.get(k, 0.0) + float(v)


def acc_batch(sums: dict[str, float], logits: torch.Tensor, labels: torch.Tensor, task: str) -> None:
    """Accumulate correct predictions and regression errors over labelled rows."""
    mask = labels >= 0
    if not mask.any():
        return
    z, y = logits[mask], labels[mask]
    add(sums, correct=float((predict_labels(z, task) == y).sum()))
    if task == "regression":
        err = z[:, 0] - y.float()
        add(sums, abs_err=float(err.abs().sum()), sq_err=float((err**2).sum()))


def val_metrics(sums: dict[str, float], p: TrainParams) -> dict[str, float]:
    """Turn validation sums into metrics."""
    if not sums.get("batches"):
        return {}
    n, lab = sums["batches"], sums.get("labelled", 0.0)
    task = sums.get("task_sum", 0.0) / lab if lab else 0.0
    out = {
        "val_contrastive": sums["con"] / n,
        "val_task": task,
        "val_loss": sums["con"] / n + p.lambda_task * task,
        "val_r1_in_batch": sums["r1"] / sums["rows"],
    }
    if lab:
        out["val_accuracy"] = sums.get("correct", 0.0) / lab
    if lab and p.task == "regression":
        out["val_mae"] = sums["abs_err"] / lab
        out["val_rmse"] = math.sqrt(sums["sq_err"] / lab)
    return out


def selection_metric(metrics: dict[str, float], task: str) -> float | None:
    """Higher is better: val accuracy for classification, else minus the val loss."""
    if task != "regression" and "val_accuracy" in metrics:
        return metrics["val_accuracy"]
    return -metrics["val_loss"] if "val_loss" in metrics else None


# ----------------------------------------------------------------------------- run


def end_epoch(shard_dir: Path, out_dir: Path, loop: Loop, seconds: float) -> dict[str, Any]:
    """Validate, record the epoch, write last.pt (and best.pt) on rank 0."""
    s = loop.sums
    nb = max(s.get("batches", 0.0), 1.0)
    row: dict[str, Any] = {
        "epoch": loop.epoch + 1, "step": loop.step,
        "train_loss": s.get("loss", 0.0) / nb, "train_contrastive": s.get("contrastive", 0.0) / nb,
        "train_task": s.get("task", 0.0) / nb, "lr": loop.scheduler.get_last_lr()[0],
        "temperature": 1.0 / float(loop.model.scale().detach()),
        "samples_per_s": s.get("samples", 0.0) / max(seconds, 1e-9), "epoch_seconds": seconds,
    }
    if loop.d.main:
        row.update(validate(shard_dir, loop))
    loop.history.append(row)
    loop.epoch, loop.batch_in_epoch, loop.sums = loop.epoch + 1, 0, {}
    if loop.d.main:
        metric = selection_metric(row, loop.p.task)
        improved = metric is not None and (loop.best is None or metric > loop.best)
        if improved:
            loop.best = metric
        save_checkpoint(checkpoint_state(loop), out_dir / "last.pt")
        if improved or not (out_dir / "best.pt").exists():
            save_checkpoint(checkpoint_state(loop, full=False), out_dir / "best.pt")
    if loop.d.enabled:
        dist.barrier()  # other ranks wait for rank 0's validation + checkpoint
    log.info("epoch %d: %s", row["epoch"], {k: round(v, 4) for k, v in row.items()
                                              if isinstance(v, float)})
    return row


def run_train(
    shard_dir: Path,
    p: TrainParams,
    out_dir: Path,
    *,
    resume: bool = False,
    tracking: TrackingParams | None = None,
    max_steps: int | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> dict[str, Any]:
    """Train on ``shard_dir`` into ``out_dir`` (last.pt, best.pt, train_report.json); the report.

    ``tracking`` is accepted for the stage signature but unused: MLflow logging happens through
    ``on_epoch_end(epoch, metrics)`` (rank 0 only). ``max_steps`` stops (with a checkpoint)
    after that many optimiser steps in total; ``resume`` continues from out_dir/last.pt.
    """
    shard_dir, out_dir = Path(shard_dir), Path(out_dir)
    manifest = read_manifest(shard_dir)
    d = init_distributed(p.device)
    try:
        loop = build_loop(shard_dir, p, d, manifest)
        loop.meta["val_count"] = manifest.get("splits", {}).get("val", {}).get("count", 0)
        last = out_dir / "last.pt"
        if resume and last.is_file():
            restore(loop, read_checkpoint(last), last)
        elif resume:
            log.warning("%s not found: starting from scratch", last)
        return train_loop(shard_dir, out_dir, loop, max_steps, on_epoch_end)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def train_loop(
    shard_dir: Path, out_dir: Path, loop: Loop, max_steps: int | None, on_epoch_end: EpochCallback | None
) -> dict[str, Any]:
    """Epochs until done, a SIGTERM or ``max_steps``; writes the report."""
    t0, interrupted = time.perf_counter(), False
    log.info("training %s on %s (amp=%s, world=%d, micro-batch=%d, %d steps/epoch)",
             loop.model.config, loop.device, loop.amp, loop.d.world_size, loop.micro_batch,
             loop.steps_per_epoch)
    with StopFlag() as stop:
        while loop.epoch < loop.p.epochs:
            t_epoch = time.perf_counter()
            if train_epoch(shard_dir, loop, stop, max_steps):
                interrupted = True
                if loop.d.main:
                    save_checkpoint(checkpoint_state(loop), out_dir / "last.pt")
                log.warning("stopped at step %d (epoch %d, micro-batch %d); resume with "
                            "--resume", loop.step, loop.epoch, loop.batch_in_epoch)
                break
            row = end_epoch(shard_dir, out_dir, loop, time.perf_counter() - t_epoch)
            if on_epoch_end is not None and loop.d.main:
                on_epoch_end(row["epoch"], dict(row))
    return write_report(out_dir, loop, interrupted, time.perf_counter() - t0)


def write_report(out_dir: Path, loop: Loop, interrupted: bool, seconds: float) -> dict[str, Any]:
    """The stage report (also out_dir/train_report.json on rank 0)."""
    last = loop.history[-1] if loop.history else {}
    report = {
        "epochs_completed": loop.epoch, "steps": loop.step, "interrupted": interrupted,
        "history": loop.history, "best_metric": loop.best, "final": last,
        "classes": loop.meta["classes"], "num_classes": loop.meta["num_classes"],
        "model": loop.model.config, "device": str(loop.device),
        "amp": str(loop.amp).replace("torch.", "") if loop.amp else "off",
        "world_size": loop.d.world_size, "seconds": round(seconds, 3),
        "checkpoint": str(out_dir / "last.pt"), "best_checkpoint": str(out_dir / "best.pt"),
    }
    if loop.d.main:
        write_json_atomic(out_dir / "train_report.json", report)
    return report
