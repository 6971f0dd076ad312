"""Stage `evaluate`: retrieval, zero-shot, classification and the fusion ablation on the test split.

Outputs under ``out_dir`` (the driver's staging directory, switched in whole):
    metrics.json          flat numbers for `dvc metrics show` (accuracy, macro_f1, i2t_r1, ...),
                          + the sha256 of the checkpoint scored and of the shard manifest
                          (``checkpoint_sha256``, ``data_sha256``: register checks both)
    per_class.json        precision / recall / F1 / support per class of the trained head
    ablation.json         every fusion head trained on frozen features, with accuracy / macro-F1
    evaluation_report.json  counts, chance levels, skipped parts with their reasons, timings
    plots/confusion_matrix.png, plots/confusion.json (rows for `dvc plots` confusion template),
    plots/recall_at_k.json, plots/ablation.json
    examples/             a few test images as thumbnails + their top-3 captions (for report.md)
    report.md, report.html

Honest caveat on the ablation: every head is trained on pooled features of the SAME encoders,
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

from mmpipe import metrics as M
from mmpipe.checkpoint import MANIFEST, load_model, pick_checkpoint, read_manifest
from mmpipe.config import EvaluateParams, TrainParams
from mmpipe.data import create_dataloader
from mmpipe.errors import InputError
from mmpipe.io import atomic_path, sha256_file, write_json_atomic
from mmpipe.model import create_fusion_head, predict_labels

log = logging.getLogger(__name__)

ABLATION_MODES = (
    "image_only",
    "text_only",
    "concat",
    "sum",
    "weighted",
    "gated",
    "cross_attention",
    "late",
)
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
    for batch in batches(shard_dir, split, batch_size, "embedding"):
        res = model(batch["image"], list(batch["text"]))
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
    rows: list[dict[str, Any]] = []
    for k in ks:
        flat[f"i2t_r{k}"], flat[f"t2i_r{k}"] = i2t[k], t2i[k]
        flat[f"i2t_chance_r{k}"], flat[f"t2i_chance_r{k}"] = chance["i2t"][k], chance["t2i"][k]
        rows.append({"k": k, "direction": "i2t", "recall": i2t[k], "chance": chance["i2t"][k]})
        rows.append({"k": k, "direction": "t2i", "recall": t2i[k], "chance": chance["t2i"][k]})
    return flat, rows


@torch.no_grad()
def zero_shot(
    model: torch.nn.Module, out: SplitOutputs, p: EvaluateParams
) -> tuple[dict[str, float], str | None]:
    """Classify each unique image by its nearest class-name prompt; (metrics, skip reason)."""
    field_name = p.zero_shot_field
    if not field_name:
        return {}, "evaluate.zero_shot_field is null"
    keep = [i for i, m in enumerate(out.image_meta) if m.get(field_name) not in (None, "")]
    if not keep:
        return {}, f"no test sample has meta field {field_name!r}"
    truth = [str(out.image_meta[i][field_name]) for i in keep]
    names = sorted(set(truth))
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


def classification(
    out: SplitOutputs, classes: list[str], task: str
) -> tuple[dict[str, float], list[dict[str, Any]], np.ndarray | None, str | None]:
    """Accuracy, macro-F1, per-class report and confusion matrix of the trained head."""
    if task not in ("multiclass", "binary"):
        return {}, [], None, f"task {task!r}: single-label classification metrics do not apply"
    labels = np.array(out.labels)
    mask = labels >= 0
    if not mask.any():
        return {}, [], None, "the test split has no labelled pairs"
    y = labels[mask]
    pred = predict_labels(torch.cat(out.logits), task).numpy()[mask]
    n = max(len(classes), int(max(y.max(), pred.max())) + 1)
    names = [classes[i] if i < len(classes) else str(i) for i in range(n)]
    flat = {
        "accuracy": M.accuracy(y, pred),
        "macro_f1": M.macro_f1(y, pred, n),
        "n_labelled": float(mask.sum()),
    }
    return flat, M.per_class_report(y, pred, n, names), M.confusion_matrix(y, pred, n), None


def plot_confusion(cm: np.ndarray, names: list[str], dest: Path) -> None:
    """Write the confusion matrix as a PNG (matplotlib, Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues", vmin=0)  # 0 = white, so the text colour rule below holds
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (r, c), v in np.ndenumerate(cm):
        ax.text(
            c,
            r,
            str(v),
            ha="center",
            va="center",
            color="white" if v > cm.max() / 2 else "black",
            fontsize=8,
        )
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


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


def retrieval_examples(out: SplitOutputs, dest_dir: Path, k: int = 3) -> list[dict[str, Any]]:
    """Save thumbnails of the first test images and their top-k captions (for the report)."""
    from PIL import Image

    sim = torch.stack(out.image_emb) @ torch.cat(out.text_emb).T  # (I, T)
    rows = []
    for n, (image_id, pixels) in enumerate(out.thumbs.items()):
        i = out.image_ids.index(image_id)
        top = np.argsort(-sim[i].numpy(), kind="stable")[:k]
        name = f"{n:02d}_{image_id}.png"
        img = Image.fromarray(pixels)
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        with atomic_path(dest_dir / name) as tmp:
            img.save(tmp, format="PNG")
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


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, shard_dir: Path, split: str, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen pooled (pre-fusion) features of labelled pairs: img (N, Fi), txt (N, Ft), y (N,)."""
    feats_i, feats_t, ys = [], [], []
    for batch in batches(shard_dir, split, batch_size, "ablation features"):
        keep = batch["label"] >= 0
        if not keep.any():
            continue
        img, txt = model.features(
            batch["image"][keep],
            [t for t, k in zip(batch["text"], keep.tolist(), strict=True) if k],
        )
        feats_i.append(img.float().cpu())
        feats_t.append(txt.float().cpu())
        ys.append(batch["label"][keep])
    if not ys:
        return torch.empty(0), torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats_i), torch.cat(feats_t), torch.cat(ys)


def _train_head(
    head: torch.nn.Module,
    x_i: torch.Tensor,
    x_t: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    seed: int,
) -> None:
    """Mini-batch AdamW on frozen features; seeded so every mode sees the same batches."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    head.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(256):
            loss = torch.nn.functional.cross_entropy(head(x_i[idx], x_t[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()


def run_ablation(
    model: torch.nn.Module,
    shard_dir: Path,
    p: EvaluateParams,
    train_params: TrainParams,
    num_classes: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """Train each fusion head on frozen train features, score on test; (rows, skip reason).

    The heads get the trained model's head width, dropout and (weighted) alpha, and its seed.
    """
    tr_i, tr_t, tr_y = extract_features(model, shard_dir, "train", p.batch_size)
    te_i, te_t, te_y = extract_features(model, shard_dir, "test", p.batch_size)
    if len(tr_y) == 0 or len(te_y) == 0:
        return [], "no labelled train or test pairs for the ablation heads"
    rows = []
    for mode in ABLATION_MODES:
        torch.manual_seed(train_params.seed)  # same init stream for every head
        head = create_fusion_head(
            mode, tr_i.shape[1], tr_t.shape[1], num_classes,
            hidden=train_params.head_hidden, dropout=train_params.dropout,
            alpha=train_params.fusion_alpha,
        )  # fmt: skip
        t0 = time.perf_counter()
        _train_head(head, tr_i, tr_t, tr_y, p.ablation_epochs, train_params.seed)
        with torch.no_grad():
            pred = head(te_i, te_t).argmax(dim=-1).numpy()
        y = te_y.numpy()
        rows.append(
            {
                "fusion": mode,
                "accuracy": M.accuracy(y, pred),
                "macro_f1": M.macro_f1(y, pred, num_classes),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        log.info(
            "evaluate: ablation head %d/%d %s: accuracy %.4f (%.1f s)",
            *(len(rows), len(ABLATION_MODES), mode, rows[-1]["accuracy"], rows[-1]["seconds"]),
        )
    return rows, None


def ablation_summary(rows: list[dict[str, Any]], fusion: str) -> dict[str, float]:
    """best_unimodal_accuracy and fusion_gain (configured mode - best unimodal, same features)."""
    acc = {r["fusion"]: r["accuracy"] for r in rows}
    best_uni = max(acc["image_only"], acc["text_only"])
    out = {"best_unimodal_accuracy": best_uni, "ablation_best_accuracy": max(acc.values())}
    if fusion in acc:
        out["fusion_gain"] = acc[fusion] - best_uni
    return out


def fusion_ablation(
    model: torch.nn.Module,
    shard_dir: Path,
    p: EvaluateParams,
    train_params: TrainParams,
    num_classes: int | None,
) -> tuple[dict[str, Any], dict[str, float], str | None]:
    """ablation.json's content, its summary metrics, and why it was skipped (None if it ran).

    ``num_classes`` None: the test split has no single-label classes to compare heads on.
    """
    fusion = train_params.fusion
    ablation: dict[str, Any] = {
        "enabled": p.ablation,
        "configured_fusion": fusion,
        "epochs": p.ablation_epochs,
        "results": [],
        "note": "heads trained on frozen features of encoders trained "
        f"with fusion={fusion!r}; see mmpipe/evaluate.py",
    }
    if not p.ablation:
        return ablation, {}, None
    if num_classes is None:
        return ablation, {}, "no classification labels"
    rows, reason = run_ablation(model, shard_dir, p, train_params, num_classes)
    ablation["results"] = rows
    return ablation, ablation_summary(rows, fusion) if rows else {}, reason


def run_evaluate(
    shard_dir: Path,
    model_dir: Path,
    p: EvaluateParams,
    out_dir: Path,
) -> dict[str, Any]:
    """Evaluate models/best.pt (else last.pt) on the test shards; returns the flat metrics dict.

    The task, the fusion mode and the ablation's head sizes and seed are the checkpoint's own
    (the train params it stores), so evaluate reads no train params.
    """
    from mmpipe.report import write_report

    t0 = time.perf_counter()
    shard_dir, model_dir, out_dir = Path(shard_dir), Path(model_dir), Path(out_dir)
    manifest = read_manifest(shard_dir, require="test")
    checkpoint = pick_checkpoint(model_dir)
    scored = provenance(checkpoint, shard_dir)
    model, info = load_model(checkpoint)
    tp = TrainParams.model_validate(info["params"])
    classes = list(manifest.get("classes") or info.get("classes") or [])
    test = embed_split(model, shard_dir, "test", p.batch_size)
    metrics: dict[str, float] = {
        "n_test_pairs": float(len(test.texts)),
        "n_test_images": float(len(test.image_ids)),
    }
    skipped: dict[str, str] = {}

    retrieval, recall_rows = retrieval_metrics(test, p.ks)
    metrics.update(retrieval)
    zs, reason = zero_shot(model, test, p)
    metrics.update(zs)
    if reason:
        skipped["zero_shot"] = reason
    cls, per_class, cm, reason = classification(test, classes, tp.task)
    metrics.update(cls)
    if reason:
        skipped["classification"] = reason
    plots = out_dir / "plots"
    write_json_atomic(plots / "recall_at_k.json", recall_rows)
    write_json_atomic(out_dir / "per_class.json", per_class)
    if cm is not None:
        names = [r["class"] for r in per_class]
        plot_confusion(cm, names, plots / "confusion_matrix.png")
        write_json_atomic(plots / "confusion.json", confusion_rows(test, names, tp.task))

    num_classes = None if cm is None else cm.shape[0]
    ablation, summary, reason = fusion_ablation(model, shard_dir, p, tp, num_classes)
    metrics.update(summary)
    if reason:
        skipped["ablation"] = reason
    write_json_atomic(out_dir / "ablation.json", ablation)
    plot_rows = [{k: r[k] for k in ("fusion", "accuracy", "macro_f1")} for r in ablation["results"]]
    write_json_atomic(plots / "ablation.json", plot_rows)
    retrieval_examples(test, out_dir / "examples")
    for part, why in skipped.items():
        log.info("evaluate: %s skipped: %s", part, why)
    write_json_atomic(out_dir / "metrics.json", {**metrics, **scored})
    write_json_atomic(
        out_dir / "evaluation_report.json",
        {
            "checkpoint": str(checkpoint),
            "skipped": skipped,
            "classes": classes,
            "seconds": round(time.perf_counter() - t0, 3),
            "metrics": metrics,
        },
    )
    write_report(out_dir)
    return {**metrics, **scored}


def provenance(checkpoint: Path, shard_dir: Path) -> dict[str, str]:
    """What a metrics file scored: the checkpoint's sha256 and the shard manifest's (the data
    version, hence the test split). register refuses metrics whose hashes are not current."""
    return {
        "checkpoint_sha256": sha256_file(checkpoint),
        "data_sha256": sha256_file(Path(shard_dir) / MANIFEST),
    }


def score_checkpoint(checkpoint: Path, shard_dir: Path, p: EvaluateParams) -> dict[str, float]:
    """A checkpoint's test metrics as ``run_evaluate`` computes them, without the ablation or any
    file (register scores a champion trained on other data on this test split with it)."""
    manifest = read_manifest(shard_dir, require="test")
    model, info = load_model(checkpoint)
    classes, own = list(manifest.get("classes") or []), list(info.get("classes") or [])
    if classes and own and classes != own:  # label indices would mean other classes
        raise InputError(f"{checkpoint}: trained on classes {own}, the test split has {classes}")
    task = TrainParams.model_validate(info["params"]).task
    test = embed_split(model, Path(shard_dir), "test", p.batch_size)
    scores = {"n_test_pairs": float(len(test.texts)), "n_test_images": float(len(test.image_ids))}
    scores.update(retrieval_metrics(test, p.ks)[0])
    scores.update(zero_shot(model, test, p)[0])
    scores.update(classification(test, classes or own, task)[0])
    return scores
