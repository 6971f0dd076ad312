"""Stage `evaluate`: retrieval, zero-shot, classification and the fusion ablation on the test split.

Outputs under ``out_dir`` (the driver's staging directory, switched in whole):
    metrics.json          flat numbers for `dvc metrics show`: retrieval (i2t_r1, mean_r1, median
                          ranks, ...) always; the task's metrics when the test split has labels
                          (mmpipe/objectives.py), with ``<primary>_chance`` and the ablation's
                          best_unimodal_<primary> / fusion_gain; numbers only (no hashes:
                          `dvc exp show` lists every key of it as a metric)
    per_class.json        precision / recall / F1 / support (multilabel: + AP) per class
    per_question_type.json  VQA accuracy per question type (vqa; an empty list otherwise)
    ablation.json         every fusion head trained on frozen features, with the task's metrics
    plots/                recall_at_k, ablation, training, and per task confusion (classes), roc
                          (binary), predicted_vs_true (regression): JSON rows for `dvc plots`
                          and the same charts as PNG (mmpipe.plots)
    evaluation_report.json  the checkpoint used, task, labels, skipped parts with their reasons,
                          and ``scored``: the sha256 of the checkpoint scored and of the shard
                          manifest (``checkpoint_sha256``, ``data_sha256``: register checks both
                          against models/ and data/shards, and the report's ``metrics`` against
                          metrics.json)
    examples/             a few test images as thumbnails + their top-3 captions (for the report)
    report.md, report.html  written by the caller (mmpipe.report), with the run's context

Unlabelled data (no labelled test or train pairs): retrieval and zero-shot only; the task
metrics and the ablation are skipped, and the log says why.

The versioned outputs (metrics.json, per_class.json, ablation.json, plots/) hold no timings or
paths: the same model and data give the same bytes, so DVC sees no change (timings are logged).

Honest caveat on the ablation: every head is trained on features (pooled, or the tokens for
cross_attention and single_stream) of the SAME encoders,
which were trained jointly with the configured fusion head (and the contrastive loss). It
compares fusion operators on fixed features; it does not retrain encoders per fusion mode, so
it can favour the configured mode and understates what end-to-end training of another mode
would reach.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe import captioning, scoring
from mmpipe import metrics as M
from mmpipe.checkpoint import load_model, pick_checkpoint
from mmpipe.config import EvaluateParams, TrainParams
from mmpipe.data import create_dataloader
from mmpipe.errors import InputError
from mmpipe.io import atomic_path, sha256_file, use_compute_allocator, write_json_atomic
from mmpipe.manifest import Manifest, manifest_sha256, read_manifest, shard_location
from mmpipe.model import (
    TOKEN_LEVEL,
    AudioConcatFusion,
    AudioLateFusion,
    Encoded,
    apply_head,
    audio_inputs,
    concat_encoded,
    create_fusion_head,
    labelled_rows,
    predict_labels,
    task_loss_sum,
)
from mmpipe.objectives import RETRIEVAL_METRIC, greater_is_better
from mmpipe.plots import plot_confusion, plot_points, recall_rows, training_rows, write_plot
from mmpipe.progress import tqdm  # a bar on a terminal, a log line every minute elsewhere
from mmpipe.report import CAPTIONS_JSON
from mmpipe.taskspec import task_spec

log = logging.getLogger(__name__)

ABLATION_MODES = (
    "image_only",
    "text_only",
    "concat",
    "sum",
    "weighted",
    "gated",
    "cross_attention_pooled",
    "cross_attention",
    "single_stream",
    "late",
)
# with an audio model: each modality's contribution on the same frozen features (audio alone;
# the image + text concat head without and with the clip)
AUDIO_ABLATION_MODES = ("audio_only", "concat+audio")
N_EXAMPLES = 6
THUMB_SIZE = 96
PROGRESS_EVERY = 10  # batches between progress lines: long passes stay visible in the flow log


@dataclass
class SplitOutputs:
    """Everything evaluate needs from one pass over a split (pairs = rows, images deduplicated)."""

    image_ids: list[str] = field(default_factory=list)  # unique, first-seen order
    image_emb: list[torch.Tensor] = field(default_factory=list)  # per unique image (D,)
    image_meta: list[dict[str, Any]] = field(default_factory=list)
    thumbs: dict[str, np.ndarray] = field(default_factory=dict)  # first images, uint8 HWC
    texts: list[str] = field(default_factory=list)  # per pair
    text_emb: list[torch.Tensor] = field(default_factory=list)
    text_to_image: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    targets: list[torch.Tensor] = field(default_factory=list)  # scoring.task_target per batch
    answers: list[str | None] = field(default_factory=list)  # the raw labels (VQA answers)
    qtypes: list[str] = field(default_factory=list)  # VQA question types
    audio_emb: list[torch.Tensor] = field(default_factory=list)  # per pair, with an audio model
    audio_mask: list[torch.Tensor] = field(default_factory=list)  # per pair: has a clip

    def target(self) -> torch.Tensor:
        """Every pair's target, concatenated."""
        return torch.cat(self.targets)


def batches(shard_dir: Path, split: str, batch_size: int, what: str) -> Iterator[dict[str, Any]]:
    """A split's batches in manifest order, with a progress line every PROGRESS_EVERY batches."""
    loader = create_dataloader(shard_dir, split, batch_size, shuffle_buffer=0)
    total = math.ceil(loader.stats["expected"] / batch_size)
    for i, batch in enumerate(loader, 1):
        if i % PROGRESS_EVERY == 0 or i == total:
            log.info("evaluate: %s of the %s split, batch %d/%d", what, split, i, total)
        yield batch


def _thumb(image: torch.Tensor) -> np.ndarray:
    """Undo the loader's (x - 0.5) / 0.5 normalisation: (3, H, W) -> uint8 (H, W, 3)."""
    x = (image.float().cpu() * 0.5 + 0.5).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def embed_split(
    model: torch.nn.Module, shard_dir: Path, split: str, batch_size: int
) -> SplitOutputs:
    """One pass: pair logits + caption embeddings, image embeddings deduplicated by image_id."""
    out = SplitOutputs()
    index: dict[str, int] = {}
    task = model.task
    for batch in batches(shard_dir, split, batch_size, "embedding"):
        res = model(batch["image"], list(batch["text"]), **audio_inputs(batch, "cpu"))
        if "audio_emb" in res:
            out.audio_emb.append(res["audio_emb"].float().cpu())
            out.audio_mask.append(res["audio_mask"].cpu())
        out.targets.append(scoring.task_target(batch, task, res["logits"].shape[1]))
        out.answers.extend(batch["label_text"])
        out.qtypes.extend(
            scoring.question_type(q, m or {})
            for q, m in zip(batch["text"], batch["meta"], strict=True)
        )
        for i, image_id in enumerate(batch["image_id"]):
            if image_id not in index:
                index[image_id] = len(out.image_ids)
                out.image_ids.append(image_id)
                out.image_emb.append(res["image_emb"][i].float().cpu())
                out.image_meta.append(dict(batch["meta"][i] or {}))
                if len(out.thumbs) < N_EXAMPLES:
                    out.thumbs[image_id] = _thumb(batch["image"][i])
            out.text_to_image.append(index[image_id])
        out.texts.extend(batch["text"])
        out.text_emb.append(res["text_emb"].float().cpu())
        out.labels.extend(int(v) for v in batch["label"])
        if "caption_target" not in res:  # a captioning model's logits are per word
            out.logits.append(res["logits"].float().cpu())
    if not out.texts:
        raise InputError(f"{shard_dir}: no {split} samples could be read")
    return out


def retrieval_metrics(
    out: SplitOutputs, ks: list[int]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """R@K both ways + chance levels (flat metrics) and the rows of plots/recall_at_k.json."""
    sim = torch.stack(out.image_emb) @ torch.cat(out.text_emb).T  # (I, T)
    i2t = M.recall_at_k_i2t(sim, out.text_to_image, ks)
    t2i = M.recall_at_k_t2i(sim, out.text_to_image, ks)
    chance = M.retrieval_chance(out.text_to_image, len(out.image_ids), ks)
    flat: dict[str, float] = {}
    for k in ks:
        flat[f"i2t_r{k}"], flat[f"t2i_r{k}"] = i2t[k], t2i[k]
        flat[f"i2t_chance_r{k}"], flat[f"t2i_chance_r{k}"] = chance["i2t"][k], chance["t2i"][k]
    r1 = M.recall_at_k_i2t(sim, out.text_to_image, [1])[1]
    flat[RETRIEVAL_METRIC] = 0.5 * (r1 + M.recall_at_k_t2i(sim, out.text_to_image, [1])[1])
    ranks = M.median_rank(sim, out.text_to_image)
    flat["median_rank_i2t"], flat["median_rank_t2i"] = ranks["i2t"], ranks["t2i"]
    return flat, recall_rows(ks, i2t, t2i, chance)


@torch.no_grad()
def zero_shot(
    model: torch.nn.Module, out: SplitOutputs, p: EvaluateParams
) -> tuple[dict[str, float], str | None]:
    """Classify each unique image by its nearest class-name prompt; (metrics, skip reason)."""
    field_name = p.zero_shot_field
    if not field_name:
        return {}, "evaluate.zero_shot_field is null"
    allowed = set(p.zero_shot_classes)
    keep = [
        i for i, m in enumerate(out.image_meta)
        if m.get(field_name) not in (None, "") and (not allowed or str(m[field_name]) in allowed)
    ]  # fmt: skip
    if not keep:
        wanted = f" with a value among {sorted(allowed)}" if allowed else ""
        return {}, f"no test sample has meta field {field_name!r}{wanted}"
    truth = [str(out.image_meta[i][field_name]) for i in keep]
    names = list(p.zero_shot_classes) or sorted(set(truth))
    if len(names) < 2:
        return {}, f"meta field {field_name!r} has fewer than 2 distinct values in the test split"
    prompts = [p.zero_shot_template.format(name) for name in names]
    prompt_emb = model.encode_text(prompts).float().cpu()  # (C, D)
    images = torch.stack([out.image_emb[i] for i in keep])  # (N, D)
    pred = (images @ prompt_emb.T).argmax(dim=1).numpy()
    y = np.array([names.index(t) for t in truth])
    result = {
        "zero_shot_accuracy": M.accuracy(y, pred),
        "zero_shot_macro_f1": M.macro_f1(y, pred, len(names)),
        "zero_shot_chance": 1.0 / len(names),
        "zero_shot_n": float(len(keep)),
    }
    if len(keep) < len(out.image_meta):
        log.info(
            "zero-shot: %d of %d test images carry %r", len(keep), len(out.image_meta), field_name
        )
    return result, None


@dataclass
class TaskResult:
    """The trained head's test results: flat metrics, per-class rows, plot data, or a skip."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: np.ndarray | None = None
    plots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # plots/<name>.json
    per_question_type: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None


def task_metrics(out: SplitOutputs, classes: list[str], task: str, trained: bool) -> TaskResult:
    """The task's metrics on the labelled test pairs (mmpipe/objectives.py), with the chance
    level, per-class rows and plot data; skipped (with the reason) when there is nothing to
    score. ``trained``: the head saw labelled train pairs."""
    logits, target = torch.cat(out.logits), out.target()
    if not trained:
        return TaskResult(skipped="no labelled train pairs: the task head was never trained")
    scores = scoring.score_outputs(task, logits, target)
    if not scores:
        return TaskResult(skipped="the test split has no labelled pairs")
    result = TaskResult(metrics={**scores, **scoring.chance_scores(task, logits, target)})
    details = task_spec(task).details
    if "per_question_type" in details:
        accuracy, result.per_question_type = scoring.vqa_by_type(
            logits, out.answers, out.qtypes, classes
        )
        result.metrics["vqa_accuracy"] = accuracy
        for row in result.per_question_type:
            result.metrics[f"vqa_accuracy_{_slug(row['question_type'])}"] = row["vqa_accuracy"]
    if "predicted_vs_true" in details:
        result.plots["predicted_vs_true"] = scoring.regression_rows(logits, target)
    if "per_class" in details:
        result.per_class = scoring.per_class(task, logits, target, classes)
    if "confusion" in details:
        rows = labelled_rows(target, task)
        y, pred = target[rows], predict_labels(logits[rows], task)
        result.confusion = M.confusion_matrix(y, pred, len(result.per_class))
    if "roc" in details:
        result.plots["roc"] = scoring.roc_rows(logits, target)
    return result


def _slug(text: str) -> str:
    """A metric-name-safe form of a question type ('what colour' -> 'what_colour')."""
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split()) or "other"


def confusion_rows(out: SplitOutputs, names: list[str], task: str) -> list[dict[str, str]]:
    """One {"actual", "predicted"} row per labelled pair (dvc plots' confusion template)."""
    pred = predict_labels(torch.cat(out.logits), task).numpy()

    def name(i: int) -> str:
        return names[i] if 0 <= i < len(names) else str(i)

    return [
        {"actual": name(t), "predicted": name(int(p))}
        for t, p in zip(out.labels, pred, strict=True)
        if t >= 0
    ]


def save_thumbnail(pixels: np.ndarray, path: Path) -> None:
    """A uint8 (H, W, 3) image as a PNG of at most THUMB_SIZE px a side."""
    from PIL import Image

    img = Image.fromarray(pixels)
    img.thumbnail((THUMB_SIZE, THUMB_SIZE))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def retrieval_examples(out: SplitOutputs, dest_dir: Path, k: int = 3) -> list[dict[str, Any]]:
    """Save thumbnails of the first test images and their top-k captions (for the report)."""
    sim = torch.stack(out.image_emb) @ torch.cat(out.text_emb).T  # (I, T)
    rows = []
    for n, (image_id, pixels) in enumerate(out.thumbs.items()):
        i = out.image_ids.index(image_id)
        top = np.argsort(-sim[i].numpy(), kind="stable")[:k]
        name = f"{n:02d}_{image_id}.png"
        save_thumbnail(pixels, dest_dir / name)
        rows.append(
            {
                "image_id": image_id,
                "thumbnail": name,
                "top": [
                    {
                        "rank": r + 1,
                        "caption": out.texts[j],
                        "score": float(sim[i, j]),
                        "correct": out.text_to_image[j] == i,
                    }
                    for r, j in enumerate(top.tolist())
                ],
            }
        )
    write_json_atomic(dest_dir / "examples.json", rows)
    return rows


def caption_result(
    model: torch.nn.Module, shard_dir: Path, test: SplitOutputs, p: EvaluateParams,
    examples_dir: Path | None,
) -> TaskResult:  # fmt: skip
    """Captioning's TaskResult (mmpipe.captioning): BLEU-4 and CIDEr of the beam-search captions
    and of the nearest-neighbour baseline; with ``examples_dir``, the first test images'
    thumbnails + generated, nearest and reference captions as examples/captions.json."""
    refs = captioning.group_references(test.image_ids, test.texts, test.text_to_image)
    metrics, captions = captioning.evaluate_captions(
        model, shard_dir, refs, torch.stack(test.image_emb), p.batch_size, p.beam_size
    )
    if examples_dir is not None:
        rows = captioning.caption_rows(captions, refs, list(test.thumbs))
        for n, row in enumerate(rows):
            row["thumbnail"] = f"caption_{n:02d}_{row['image_id']}.png"
            save_thumbnail(test.thumbs[row["image_id"]], examples_dir / row["thumbnail"])
        write_json_atomic(examples_dir / CAPTIONS_JSON, rows)
    return TaskResult(metrics=metrics)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, shard_dir: Path, split: str, batch_size: int, tokens: bool = True
) -> tuple[Encoded | None, Encoded | None, torch.Tensor, Encoded | None]:
    """Frozen pre-fusion features of the scored pairs, pooled (N, F) and tokens (N, T, F) of
    each modality (text tokens padded to the longest; none kept unless ``tokens``), their
    targets (scoring.task_target's form) and, for an audio model on audio shards, the clips'
    pooled features with mask (N, 1) = has a clip (else None); None, None, empty, None without
    scored pairs."""
    feats_i, feats_t, ys, feats_a = [], [], [], []
    k = int(model.config["num_outputs"])
    for batch in batches(shard_dir, split, batch_size, "ablation features"):
        target = scoring.task_target(batch, model.task, k)
        keep = scoring.scored_rows(model.task, target)
        if not keep.any():
            continue
        texts = [t for t, kept in zip(batch["text"], keep.tolist(), strict=True) if kept]
        img, txt = model.encode(batch["image"][keep], texts)
        feats_i.append(img.to_cpu() if tokens else img.pooled_only())
        feats_t.append(txt.to_cpu() if tokens else txt.pooled_only())
        ys.append(target[keep])
        if getattr(model, "audio_encoder", None) is not None and "audio" in batch:
            xa = model.audio_encoder(batch["audio"][keep]).float()  # (B', Fa)
            mask = batch["audio_mask"][keep][:, None]  # (B', 1)
            feats_a.append(Encoded(xa, xa[:, None, :0], mask))
    if not ys:
        return None, None, torch.empty(0, dtype=torch.long), None
    audio = concat_encoded(feats_a) if feats_a else None
    return concat_encoded(feats_i), concat_encoded(feats_t), torch.cat(ys), audio


def _train_head(
    head: torch.nn.Module,
    x_i: Encoded,
    x_t: Encoded,
    y: torch.Tensor,
    task: str,
    epochs: int,
    seed: int,
    x_a: Encoded | None = None,
) -> None:
    """Mini-batch AdamW with the task's loss on frozen features; seeded so every mode sees the
    same batches. ``y``: scoring.task_target's form (multi-hot for multilabel); ``x_a``: the
    clips' features, read by the audio heads (``audio_only``, ``concat+audio``)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    if task_spec(task).target == "labels":  # the loss takes class lists: multi-hot as indices
        y = torch.where(y > 0, torch.arange(y.shape[1]), -1)
    head.train()
    for _ in tqdm(range(epochs), desc="ablation head", unit="epoch", disable=None, leave=False):
        for idx in torch.randperm(len(y), generator=gen).split(256):
            logits = _head_logits(head, x_i, x_t, x_a, idx)
            total, n = task_loss_sum(logits, y[idx], task)
            if n == 0:
                continue
            opt.zero_grad(set_to_none=True)
            (total / n).backward()
            opt.step()
    head.eval()


def run_ablation(
    model: torch.nn.Module,
    shard_dir: Path,
    p: EvaluateParams,
    train_params: TrainParams,
) -> tuple[list[dict[str, Any]], str | None]:
    """Train each fusion head on frozen train features, score on test; (rows, skip reason).

    The heads get the trained model's task, output count, head width, dropout and (weighted)
    alpha, and its seed. Each row has the task's metrics and ``score`` (its primary metric).
    """
    task, k = model.task, int(model.config["num_outputs"])
    tokens = p.ablation_tokens
    tr_i, tr_t, tr_y, tr_a = extract_features(model, shard_dir, "train", p.batch_size, tokens)
    te_i, te_t, te_y, te_a = extract_features(model, shard_dir, "test", p.batch_size, tokens)
    if tr_i is None or te_i is None or tr_t is None or te_t is None:
        return [], "no labelled train or test pairs for the ablation heads"
    rows = []
    modes = [m for m in ABLATION_MODES if tokens or m not in TOKEN_LEVEL]
    if tr_a is not None and te_a is not None:
        modes += list(AUDIO_ABLATION_MODES)
    dims = (tr_i.pooled.shape[1], tr_t.pooled.shape[1], tr_a.pooled.shape[1] if tr_a else 0)
    for mode in modes:
        torch.manual_seed(train_params.seed)  # same init stream for every head
        head = create_ablation_head(mode, *dims, k, train_params)
        t0 = time.perf_counter()
        _train_head(head, tr_i, tr_t, tr_y, task, p.ablation_epochs, train_params.seed, tr_a)
        with torch.no_grad():
            scores = scoring.score_outputs(task, head_outputs(head, te_i, te_t, te_a), te_y)
        scores.pop("n_labelled", None)
        score = scoring.primary_score(task, scores)
        rows.append({"fusion": mode, **scores, "score": score})  # no timings: versioned output
        log.info("evaluate: ablation head %d/%d %s: %s %.4f (%.1f s)", len(rows),
                 len(modes), mode, task_spec(task).register_metric, score,
                 time.perf_counter() - t0)  # fmt: skip
    return rows, None


def create_ablation_head(
    mode: str, di: int, dt: int, da: int, k: int, tp: TrainParams
) -> torch.nn.Module:
    """The ablation's head for ``mode``: a fusion mode, ``audio_only`` or ``concat+audio`` (one
    MLP on image, text and clip), sized like the trained model's head."""
    kw: dict[str, Any] = {"hidden": tp.head_hidden, "dropout": tp.dropout}
    if mode == "audio_only":
        return AudioLateFusion(None, da, k, **kw)
    if mode == "concat+audio":
        return AudioConcatFusion(di, dt, da, k, **kw)
    return create_fusion_head(mode, di, dt, k, alpha=tp.fusion_alpha, layers=tp.fusion_layers, **kw)


def head_outputs(
    head: torch.nn.Module, x_i: Encoded, x_t: Encoded, x_a: Encoded | None = None
) -> torch.Tensor:
    """A trained ablation head's logits over a whole split, in chunks (token-level heads'
    attention over every test pair at once would be one large allocation)."""
    rows = torch.arange(len(x_i.pooled)).split(1024)
    return torch.cat([_head_logits(head, x_i, x_t, x_a, r) for r in rows])


def _head_logits(
    head: torch.nn.Module, x_i: Encoded, x_t: Encoded, x_a: Encoded | None, rows: torch.Tensor
) -> torch.Tensor:
    """An ablation head's logits of ``rows``: the audio heads also read the clips."""
    if isinstance(head, AudioLateFusion | AudioConcatFusion) and x_a is not None:
        return head(x_i.select(rows), x_t.select(rows), x_a.select(rows))
    return apply_head(head, x_i.select(rows), x_t.select(rows))


def ablation_summary(rows: list[dict[str, Any]], fusion: str, task: str) -> dict[str, float]:
    """best_unimodal_<primary>, ablation_best_<primary> and fusion_gain (configured mode minus
    the best unimodal head on the same features; positive = fusion is better, also for errors)."""
    primary = task_spec(task).register_metric
    sign = 1.0 if greater_is_better(primary) else -1.0
    score = {r["fusion"]: r["score"] for r in rows}
    best = max if sign > 0 else min
    best_uni = best(score["image_only"], score["text_only"])
    out = {f"best_unimodal_{primary}": best_uni, f"ablation_best_{primary}": best(score.values())}
    if fusion in score:
        out["fusion_gain"] = sign * (score[fusion] - best_uni)
    if "concat+audio" in score:  # what the clip adds to the same image + text head
        out["audio_gain"] = sign * (score["concat+audio"] - score["concat"])
    return out


EXPERIMENT_ENV = "DVC_EXP_BASELINE_REV"  # set by `dvc exp run` for every stage it runs
OFF_IN_EXPERIMENT = (
    "evaluate.ablation is auto: off in an experiment (`dvc exp run`); "
    "`-S evaluate.ablation=true` runs it"
)


def ablation_enabled(p: EvaluateParams, experiment: bool) -> tuple[bool, str | None]:
    """Whether the ablation runs, and why not when ``auto`` turns it off (``experiment``: this
    evaluate runs under `dvc exp run`)."""
    if p.ablation == "auto":
        return (False, OFF_IN_EXPERIMENT) if experiment else (True, None)
    return bool(p.ablation), None


def fusion_ablation(
    model: torch.nn.Module,
    shard_dir: Path,
    p: EvaluateParams,
    train_params: TrainParams,
    labelled: bool,
    experiment: bool = False,
) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """ablation.json's content, its summary metrics, and why it was skipped (None if it ran or
    was switched off).

    ``labelled`` False: the task metrics were skipped, so there is nothing to compare heads on.
    """
    fusion = train_params.fusion
    enabled, why_off = ablation_enabled(p, experiment)
    ablation: dict[str, Any] = {
        "enabled": enabled,
        "configured_fusion": fusion,
        "epochs": p.ablation_epochs,
        "results": [],
        "note": "heads trained on frozen features of encoders trained "
        f"with fusion={fusion!r}; see mmpipe/evaluate.py",
    }
    if not enabled:
        return ablation, {}, why_off
    if not labelled:
        return ablation, {}, "no labelled pairs to train and score the heads on"
    rows, reason = run_ablation(model, shard_dir, p, train_params)
    ablation["results"] = rows
    ablation["metric"] = task_spec(model.task).register_metric
    summary = ablation_summary(rows, fusion, model.task) if rows else {}
    return ablation, summary, reason


# per-task plots: a run removes those of another task a previous run left behind
TASK_PLOTS = ("confusion.png", "confusion.json", "roc.png", "roc.json",
              "predicted_vs_true.png", "predicted_vs_true.json")  # fmt: skip


def labelled_train(manifest: Manifest) -> bool:
    """Whether the task head saw labelled train pairs."""
    return manifest.labelled("train")


def write_task_outputs(result: TaskResult, out_dir: Path, test: SplitOutputs, task: str) -> None:
    """per_class.json, per_question_type.json (empty but for vqa) and the task's plots (PNG +
    JSON rows)."""
    plots = out_dir / "plots"
    for name in TASK_PLOTS:
        (plots / name).unlink(missing_ok=True)
    write_json_atomic(out_dir / "per_class.json", result.per_class)
    # written for every task (empty but for vqa): a versioned output (dvc.yaml), so a restore
    # never leaves another run's behind
    write_json_atomic(out_dir / "per_question_type.json", result.per_question_type)
    if result.confusion is not None:
        names = [r["class"] for r in result.per_class]
        plot_confusion(result.confusion, names, plots / "confusion.png")
        write_json_atomic(plots / "confusion.json", confusion_rows(test, names, task))
    axes = {"roc": ("fpr", "tpr", True), "predicted_vs_true": ("true", "predicted", False)}
    for name, rows in result.plots.items():
        write_json_atomic(plots / f"{name}.json", rows)
        if rows:
            plot_points(rows, *axes[name][:2], plots / f"{name}.png", diagonal=axes[name][2])


def audio_retrieval(out: SplitOutputs, ks: list[int]) -> dict[str, float]:
    """R@K of the audio pairs (an audio model on shards with clips; else {}): image<->audio
    (gallery: the test images; queries: the clips) and text<->audio (gallery: one clip per
    image, the first; queries: the captions of those images). A hit is the same image group;
    pairs without a clip take no part."""
    if not out.audio_emb:
        return {}
    mask = torch.cat(out.audio_mask).bool()
    clips = torch.cat(out.audio_emb)[mask]  # (A, D)
    clip_image = torch.tensor(out.text_to_image)[mask].tolist()  # the image of each clip
    flat = {"n_test_audio": float(len(clips))}
    if not len(clips):
        return flat
    sim = torch.stack(out.image_emb) @ clips.T  # (I, A)
    first: dict[int, int] = {}
    for j, image in enumerate(clip_image):
        first.setdefault(image, j)
    gallery = {image: n for n, image in enumerate(first)}
    rows = [t for t, image in enumerate(out.text_to_image) if image in gallery]
    text_sim = clips[list(first.values())] @ torch.cat(out.text_emb)[rows].T  # (G, T')
    text_group = [gallery[out.text_to_image[t]] for t in rows]
    for name, r in (
        ("i2a", M.recall_at_k_i2t(sim, clip_image, ks)),
        ("a2i", M.recall_at_k_t2i(sim, clip_image, ks)),
        ("a2t", M.recall_at_k_i2t(text_sim, text_group, ks)),
        ("t2a", M.recall_at_k_t2i(text_sim, text_group, ks)),
    ):
        flat.update({f"{name}_r{k}": v for k, v in r.items()})
    return flat


@torch.no_grad()
def itm_metrics(
    model: torch.nn.Module, shard_dir: Path, batch_size: int, seed: int
) -> tuple[dict[str, float], str | None]:
    """Image-text matching on the test split: each pair against negatives sampled from its
    batch by contrastive similarity with a generator seeded by ``seed`` (the same negatives
    every run); itm_accuracy (logit > 0 = match), itm_auroc, n_itm_pairs. ({}, why) for a
    model without an ITM head."""
    if getattr(model, "itm_head", None) is None:
        return {}, (
            f"fusion={model.config['fusion']} has no ITM head (it needs a token-level fusion, "
            "cross_attention or single_stream, trained with train.itm_weight > 0)"
        )
    from mmpipe.train import group_ids

    gen = torch.Generator().manual_seed(seed)
    logits, labels = [], []
    for batch in batches(shard_dir, "test", batch_size, "image-text matching"):
        ei, et = model.encode(batch["image"], list(batch["text"]))
        sim = model.encode_image_features(ei) @ model.encode_text_features(et).T  # (B, B)
        z, y = model.itm(ei, et, sim, group_ids(batch["image_id"]), gen)
        logits.append(z.float().cpu())
        labels.append(y.cpu())
    z, y = torch.cat(logits), torch.cat(labels)
    return {
        "itm_accuracy": M.accuracy(y.long(), (z > 0).long()),
        "itm_auroc": M.auroc(y, z),
        "n_itm_pairs": float(len(y)),
    }, None


def run_evaluate(
    shard_dir: str | Path,
    model_dir: Path,
    p: EvaluateParams,
    out_dir: Path,
    *,
    experiment: bool = False,
) -> dict[str, Any]:
    """Evaluate models/best.pt (else last.pt) on the test shards; returns the flat metrics dict.

    The task, the fusion mode and the ablation's head sizes and seed are the checkpoint's own
    (the train params it stores), so evaluate reads no train params. ``experiment``: it runs
    under `dvc exp run`, where ``evaluate.ablation: auto`` leaves the ablation out.
    """
    t0 = time.perf_counter()
    shard_dir, model_dir, out_dir = shard_location(shard_dir), Path(model_dir), Path(out_dir)
    use_compute_allocator()  # not a data stage's malloc setting of this process
    read_manifest(shard_dir, require="test")  # its one-line error before any other
    checkpoint = pick_checkpoint(model_dir)
    scored = provenance(checkpoint, shard_dir)
    (out_dir / "examples" / CAPTIONS_JSON).unlink(missing_ok=True)  # a previous run's
    s = score_test(checkpoint, shard_dir, p, out_dir / "examples")
    model, tp, metrics, skipped = s.model, s.train_params, s.metrics, s.skipped
    plots = out_dir / "plots"
    write_plot(plots, "recall_at_k", s.recall)
    write_plot(plots, "training", training_rows(s.info.get("history") or []))
    write_task_outputs(s.result, out_dir, s.test, model.task)

    captions = task_spec(model.task).captions
    labelled = s.result.skipped is None and not captions
    ablation, summary, reason = fusion_ablation(model, shard_dir, p, tp, labelled, experiment)
    metrics.update(summary)
    if captions and ablation["enabled"]:
        reason = f"{model.task} has a caption decoder, no fusion head to compare"
    if reason:
        skipped["ablation"] = reason
    write_json_atomic(out_dir / "ablation.json", ablation)
    plot_rows = [dict(r) for r in ablation["results"]]  # fusion, the task's metrics, score
    write_plot(plots, "ablation", plot_rows, tp.fusion, task_spec(model.task).register_metric)
    retrieval_examples(s.test, out_dir / "examples")
    for part, why in skipped.items():
        log.info("evaluate: %s skipped: %s", part, why)
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_json_atomic(
        out_dir / "evaluation_report.json",
        {
            "checkpoint": checkpoint.name,
            "task": model.task,
            "labels": s.manifest.labels,
            "skipped": skipped,
            "classes": s.classes,
            "metrics": metrics,
            "scored": scored,
        },
    )
    log.info("evaluate took %.1f s", time.perf_counter() - t0)
    return metrics


@dataclass
class TestScores:
    """A checkpoint's scores on the test split (``score_test``), with what evaluate writes
    beside them."""

    metrics: dict[str, float]  # metrics.json's, before the ablation's summary
    skipped: dict[str, str]  # part -> why it was not scored
    model: torch.nn.Module
    info: dict[str, Any]  # the checkpoint's meta (history, params, classes)
    train_params: TrainParams  # the ones the checkpoint was trained with
    manifest: Manifest
    classes: list[str]
    test: SplitOutputs
    result: TaskResult  # the task's metrics, per-class rows and plot data
    recall: list[dict[str, Any]]  # plots/recall_at_k.json's rows


def score_test(
    checkpoint: Path, shard_dir: str | Path, p: EvaluateParams, examples_dir: Path | None = None
) -> TestScores:
    """A checkpoint's test metrics: retrieval (+ audio), zero-shot, image-text matching and the
    task's metrics; the one scoring path of evaluate and of register's re-scoring
    (``score_checkpoint``). InputError when the checkpoint's classes are not the test split's
    (its label indices would mean other classes). ``examples_dir``: where captioning writes
    its example captions (None: no file)."""
    shard_dir = shard_location(shard_dir)
    manifest = read_manifest(shard_dir, require="test")
    model, info = load_model(checkpoint)
    tp = TrainParams.model_validate(info["params"])
    classes, own = list(manifest.classes), list(info.get("classes") or [])
    if classes and own and classes != own:
        raise InputError(f"{checkpoint}: trained on classes {own}, the test split has {classes}")
    log.info("evaluate: %s (task %s) on the test split; labels: %s", checkpoint, model.task,
             manifest.labels)  # fmt: skip
    test = embed_split(model, shard_dir, "test", p.batch_size)
    metrics = {"n_test_pairs": float(len(test.texts)), "n_test_images": float(len(test.image_ids))}
    skipped: dict[str, str] = {}
    retrieval, recall = retrieval_metrics(test, p.ks)
    metrics.update(retrieval)
    metrics.update(audio_retrieval(test, p.ks))
    for part, (scores, reason) in (
        ("zero_shot", zero_shot(model, test, p)),
        ("itm", itm_metrics(model, shard_dir, p.batch_size, tp.seed)),
    ):
        metrics.update(scores)
        if reason:
            skipped[part] = reason
    if task_spec(model.task).captions:
        result = caption_result(model, shard_dir, test, p, examples_dir)
    else:
        result = task_metrics(test, classes or own, model.task, labelled_train(manifest))
    metrics.update(result.metrics)
    if result.skipped:
        skipped["task_metrics"] = result.skipped
    return TestScores(metrics, skipped, model, info, tp, manifest, classes or own, test, result,
                      recall)  # fmt: skip


def provenance(checkpoint: Path, shard_dir: Path) -> dict[str, str]:
    """What a metrics file scored: the checkpoint's sha256 and the shard manifest's (the data
    version, hence the test split), kept in evaluation_report.json (hashes are not metrics).
    register refuses metrics whose hashes are not current."""
    return {
        "checkpoint_sha256": sha256_file(checkpoint),
        "data_sha256": manifest_sha256(shard_dir),
    }


def score_checkpoint(checkpoint: Path, shard_dir: Path, p: EvaluateParams) -> dict[str, float]:
    """A checkpoint's test metrics as ``run_evaluate`` computes them, without the ablation or any
    file (register scores a champion trained on other data on this test split with it)."""
    return score_test(checkpoint, shard_dir, p).metrics
