"""Captioning's evaluation: generated captions, the nearest-neighbour baseline, BLEU-4, CIDEr.

One hypothesis per test image, scored against ALL of its reference captions (the test split's
captions grouped by image_id) with pycocoevalcap's ``Bleu(4)`` and ``Cider`` (CIDEr-D) scorer
classes; its Java tools (PTBTokenizer, METEOR, SPICE) are not used: both sides are tokenised by
the project's own word tokenisation (``model.text.words``: lower-case letters and digits joined
by spaces), which is also what the decoder's vocabulary is made of.

The baseline (``nn_bleu4``, ``nn_cider``): for each test image, the train caption whose text
embedding is closest to the image embedding in the trained model's own shared space; it shows
what retrieval alone gets, so the decoder's scores mean something. CIDEr's IDF is computed over
the references of the scored images, so it is comparable only between runs on one test split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmpipe.data import create_dataloader, iterate_split
from mmpipe.model.text import words

log = logging.getLogger(__name__)

METRICS = ("bleu4", "cider", "nn_bleu4", "nn_cider")


def caption_scores(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]
                   ) -> dict[str, float]:  # fmt: skip
    """{"bleu4", "cider"} of one hypothesis per image id against all its references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [" ".join(words(h))] for k, h in hypotheses.items()}
    gts = {k: [" ".join(words(r)) for r in references[k]] for k in hypotheses}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def group_references(
    image_ids: Sequence[str], texts: Sequence[str], text_to_image: Sequence[int]
) -> dict[str, list[str]]:
    """Each image's captions: pairs (text, index of its image) grouped by image id."""
    refs: dict[str, list[str]] = {i: [] for i in image_ids}
    for text, image in zip(texts, text_to_image, strict=True):
        refs[image_ids[image]].append(text)
    return refs


@torch.no_grad()
def generate_split(
    model: torch.nn.Module, shard_dir: Path, split: str, batch_size: int, beam: int
) -> dict[str, str]:
    """A generated caption for each image of a split (first pair of each image), by image id."""
    out: dict[str, str] = {}
    loader = create_dataloader(shard_dir, split, batch_size, shuffle_buffer=0)
    for batch in loader:
        seen, rows = set(out), []
        for i, image_id in enumerate(batch["image_id"]):
            if image_id not in seen:
                seen.add(image_id)
                rows.append(i)
        if not rows:
            continue
        encoded = model.image_encoder.encode(batch["image"][rows])
        for i, caption in zip(rows, model.decoder.generate(encoded, beam), strict=True):
            out[batch["image_id"][i]] = caption
    return out


def train_captions(shard_dir: Path) -> list[str]:
    """The distinct train captions, sorted (the baseline's candidates)."""
    return sorted({sample["txt"] for sample in iterate_split(shard_dir, "train")})


@torch.no_grad()
def nearest_captions(
    model: torch.nn.Module,
    image_ids: Sequence[str],
    image_emb: torch.Tensor,
    candidates: Sequence[str],
    batch_size: int,
) -> dict[str, str]:
    """The candidate caption closest to each image embedding (N, D), by image id."""
    text_emb = torch.cat([
        model.encode_text(list(candidates[i : i + batch_size])).float().cpu()
        for i in range(0, len(candidates), batch_size)
    ])  # fmt: skip
    best = (image_emb.float() @ text_emb.T).argmax(dim=1).tolist()
    return {image_id: candidates[j] for image_id, j in zip(image_ids, best, strict=True)}


def evaluate_captions(
    model: torch.nn.Module,
    shard_dir: Path,
    references: Mapping[str, Sequence[str]],
    image_emb: torch.Tensor,
    batch_size: int,
    beam: int,
) -> tuple[dict[str, float], dict[str, dict[str, str]]]:
    """(metrics: bleu4, cider, nn_bleu4, nn_cider, n_caption_images; the captions by image id:
    {"generated", "nearest"}). ``image_emb`` (N, D): the images of ``references``, in order."""
    ids = list(references)
    generated = generate_split(model, shard_dir, "test", batch_size, beam)
    nearest = nearest_captions(model, ids, image_emb, train_captions(shard_dir), batch_size)
    scores = caption_scores({i: generated[i] for i in ids}, references)
    baseline = caption_scores(nearest, references)
    metrics = {**scores, "nn_bleu4": baseline["bleu4"], "nn_cider": baseline["cider"],
               "n_caption_images": float(len(ids))}  # fmt: skip
    log.info("captioning: BLEU-4 %.3f CIDEr %.3f (nearest-neighbour caption: %.3f, %.3f) on %d "
             "test images, beam %d", metrics["bleu4"], metrics["cider"], metrics["nn_bleu4"],
             metrics["nn_cider"], len(ids), beam)  # fmt: skip
    return metrics, {"generated": generated, "nearest": nearest}


def caption_rows(
    captions: Mapping[str, Mapping[str, str]], references: Mapping[str, Sequence[str]],
    image_ids: Sequence[str],
) -> list[dict[str, Any]]:  # fmt: skip
    """The report's example rows of ``image_ids``: generated, nearest and reference captions."""
    return [
        {"image_id": i, "generated": captions["generated"][i], "nearest": captions["nearest"][i],
         "references": list(references[i])}
        for i in image_ids
    ]  # fmt: skip
