"""`mmpipe eval-retrieval`: score any model on any image-caption collection.

    report = eval_retrieval(root, "captions.jsonl", predictor, source="folder")

The protocol of the Flickr8K/30K and COCO retrieval tables (Karpathy & Fei-Fei 2015; CLIP;
clip_benchmark): every image and every caption of the collection is embedded once; each caption
queries all images (text->image R@K: its own image in the top K), each image queries all
captions (image->text R@K: ANY of its captions in the top K). Median ranks, counts and the
chance levels come with them. The collection is read by ingest's own readers and caption checks,
and each image through the model's own preprocessing (``Predictor``); a record that fails is
counted with its reason, never fatal.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from mmpipe import metrics as M
from mmpipe.config import IngestParams
from mmpipe.errors import InputError
from mmpipe.io import resolve_inside
from mmpipe.predict import Predictor

log = logging.getLogger(__name__)

KS = (1, 5, 10)


def read_collection(
    root: str | Path,
    captions: str,
    source: str = "folder",
    image_column: str = "image",
    caption_column: str = "caption",
) -> tuple[dict[str, list[str]], Counter[str], int]:
    """{image path: its captions} in file order, reject counts by reason, rows read."""
    from mmpipe.ingest import _check_caption, read_coco, read_folder

    p = IngestParams(source=source, root=str(root), captions=captions, image_column=image_column,
                     caption_column=caption_column)  # fmt: skip
    src = read_coco(p) if source == "coco" else read_folder(p)
    images: dict[str, list[str]] = {}
    rejected: Counter[str] = Counter()
    rows = 0
    for row in src.rows:
        rows += 1
        draft, reason = _check_caption(row, p)
        if draft is None:
            rejected[f"caption:{reason[0]}"] += 1
            continue
        path = resolve_inside(src.root, draft["image_ref"])
        if path is None:
            rejected["caption:path_escapes_root"] += 1
            continue
        images.setdefault(str(path), []).append(draft["caption"])
    return images, rejected, rows


def _embed_images(
    predictor: Predictor, paths: list[str], batch: int, rejected: Counter[str]
) -> tuple[torch.Tensor, list[str]]:
    """(N, D) embeddings of the readable images and their paths; unreadable ones counted."""
    kept, rows, pending = [], [], []

    def flush() -> None:
        if pending:
            with torch.no_grad():
                x = torch.stack([t for _, t in pending]).to(predictor.device)
                rows.append(predictor.model.encode_image(x).float().cpu())
            kept.extend(p for p, _ in pending)
            pending.clear()

    started, last = time.perf_counter(), time.perf_counter()
    for i, path in enumerate(paths, 1):
        try:
            pending.append((path, predictor.image_tensor(path)))
        except InputError as exc:
            rejected["image:not_found" if "not found" in str(exc) else "image:unreadable"] += 1
            log.warning("eval-retrieval: %s", exc)
        if len(pending) == batch:
            flush()
        if time.perf_counter() - last > 30:  # progress where no terminal shows a bar
            last = time.perf_counter()
            rate = i / (last - started)
            log.info("eval-retrieval: %d/%d images (%.1f/s, ETA %.0f s)", i, len(paths), rate,
                     (len(paths) - i) / max(rate, 1e-9))  # fmt: skip
    flush()
    dim = rows[0].shape[1] if rows else 0
    return (torch.cat(rows) if rows else torch.empty(0, dim)), kept


def eval_retrieval(
    root: str | Path,
    captions: str,
    predictor: Predictor,
    *,
    source: str = "folder",
    batch_size: int = 64,
    ks: tuple[int, ...] = KS,
) -> dict[str, Any]:
    """R@K both ways, median ranks, counts and chance levels of ``predictor`` on a collection."""
    started = time.perf_counter()
    by_image, rejected, rows = read_collection(root, captions, source)
    if not by_image:
        raise InputError(f"{Path(root) / captions}: no usable image-caption record")
    image_emb, kept = _embed_images(predictor, list(by_image), batch_size, rejected)
    lost = sum(len(by_image[p]) for p in by_image if p not in set(kept))
    if lost:
        rejected["caption:image_unreadable"] += lost
    texts = [c for p in kept for c in by_image[p]]
    owner = [i for i, p in enumerate(kept) for _ in by_image[p]]
    if len(kept) < 2 or not texts:
        raise InputError(f"{root}: fewer than 2 readable images with captions; nothing to rank")
    text_emb = predictor.embed_captions(texts, batch_size=max(batch_size, 256))
    sim = image_emb @ text_emb.T  # (I, T)
    i2t, t2i = M.recall_at_k_i2t(sim, owner, ks), M.recall_at_k_t2i(sim, owner, ks)
    chance = M.retrieval_chance(owner, len(kept), ks)
    ranks = M.median_rank(sim, owner)
    return {
        "protocol": "each caption queries all images (t2i); each image queries all captions, "
        "a hit for any of its own (i2t)",
        "model": predictor.source,
        "collection": str(Path(root) / captions),
        "images": len(kept),
        "captions": len(texts),
        "rows_read": rows,
        "rejected": dict(sorted(rejected.items())),
        "i2t": {f"R@{k}": round(i2t[k], 4) for k in ks},
        "t2i": {f"R@{k}": round(t2i[k], 4) for k in ks},
        "median_rank": {"i2t": ranks["i2t"], "t2i": ranks["t2i"]},
        "chance": {
            "i2t": {f"R@{k}": round(chance["i2t"][k], 6) for k in ks},
            "t2i": {f"R@{k}": round(chance["t2i"][k], 6) for k in ks},
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
