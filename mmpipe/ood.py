"""Is an input like what the model was trained on? Nearest-neighbour checks against training data.

At registration, ``create_profile`` keeps a reference set of up to ``REFERENCE_LIMIT`` training
images and captions, measures the validation split against it, and stores one threshold per
check: the ``PERCENTILE``-th percentile of the validation scores, on the bad side. Validation
inputs are unseen but drawn like the training data, so 99 % of such inputs pass each check. An
input that fails one looks unlike anything in training (a real photo for a model trained on
generated shapes); ``mmpipe predict`` and ``search`` warn about it instead of silently answering
with a confident but meaningless label.

    image    pixels      L1 distance of its colour + gradient histograms to the nearest training
                         image (as the model sees it: preprocessed like the shards). Describes
                         the data, whatever the model learned: a photo among flat shapes fails.
             embedding   cosine similarity to the nearest training image in the model's space:
                         what the model makes of it (meaningful once the model is trained).
    caption  words       fraction of its words that occur in the training captions.
             embedding   as for images, in the caption embedding space.

With two checks per kind at 1 % each, up to ~2 % of in-distribution inputs are flagged. The
profile is an ``.npz`` of plain arrays (loaded with ``allow_pickle=False``) stored beside the
checkpoint in the registered model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmpipe.io import atomic_path

log = logging.getLogger(__name__)

PROFILE_FILE = "ood_profile.npz"
REFERENCE_LIMIT = 2048  # training images (and captions) kept as the reference set
VALIDATION_LIMIT = 2048
PERCENTILE = 1.0
MIN_VALIDATION = 5  # fewer validation images or captions than this: no profile
COLOUR_LEVELS = 4  # per channel: a 4 x 4 x 4 colour histogram
GRADIENT_EDGES = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32)  # of the grey-level gradient magnitude
_WORD = re.compile(r"[^\W\d_]+")
# (check, kind, higher is better, what failing it means)
CHECKS = (
    ("image_pixels", "image", False, "its colours and edges are unlike every training image's"),
    ("image_embedding", "image", True, "the model embeds it far from every training image"),
    ("caption_words", "caption", True, "few of its words occur in the training captions"),
    ("caption_embedding", "caption", True, "the model embeds it far from every training caption"),
)


def image_statistics(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) loader-normalised images -> (B, 64 + 7) colour + gradient histograms."""
    x = ((images.float() + 1) / 2).clamp(0, 1 - 1e-6)  # undo (x - 0.5) / 0.5
    q = (x * COLOUR_LEVELS).long()  # (B, 3, H, W) levels
    index = (q[:, 0] * COLOUR_LEVELS + q[:, 1]) * COLOUR_LEVELS + q[:, 2]  # (B, H, W)
    bins = COLOUR_LEVELS**3
    colour = torch.stack([torch.bincount(i.flatten(), minlength=bins) for i in index]).float()
    grey = x.mean(1)  # (B, H, W)
    dy, dx = grey[:, 1:, 1:] - grey[:, :-1, 1:], grey[:, 1:, 1:] - grey[:, 1:, :-1]
    magnitude = (dx**2 + dy**2).sqrt()  # (B, H-1, W-1)
    edges = torch.tensor(GRADIENT_EDGES)
    grad = torch.stack(
        [torch.bucketize(m.flatten(), edges).bincount(minlength=len(edges) + 1) for m in magnitude]
    ).float()
    return torch.cat(
        [colour / colour.sum(1, keepdim=True), grad / grad.sum(1, keepdim=True)], dim=1
    )


def words(caption: str) -> list[str]:
    """Lower-case words of a caption (letters only)."""
    return _WORD.findall(caption.lower())


def word_coverage(captions: Sequence[str], vocabulary: set[str]) -> np.ndarray:
    """(B,) fraction of each caption's words found in ``vocabulary`` (1.0 for no words)."""
    out = []
    for caption in captions:
        ws = words(caption)
        out.append(sum(w in vocabulary for w in ws) / len(ws) if ws else 1.0)
    return np.array(out, dtype=np.float64)


def nearest(x: torch.Tensor, reference: torch.Tensor, check: str) -> np.ndarray:
    """(B,) score of each row against its nearest reference row: cosine similarity of embeddings
    (rows L2-normalised), L1 distance of pixel histograms."""
    if check.endswith("pixels"):
        return torch.cdist(x.float(), reference.float(), p=1).min(dim=1).values.numpy()
    return (x.float() @ reference.float().T).max(dim=1).values.numpy()


@dataclass(frozen=True)
class Profile:
    """The training data's reference set and the validation thresholds of each check."""

    image_pixels: torch.Tensor  # (N, 71) histograms of the reference images
    image_embedding: torch.Tensor  # (N, D) L2-normalised
    caption_embedding: torch.Tensor  # (M, D)
    vocabulary: frozenset[str]
    thresholds: dict[str, float]
    percentile: float = PERCENTILE

    def scores(
        self, pixels: torch.Tensor | None = None, image_emb: torch.Tensor | None = None,
        captions: Sequence[str] = (), caption_emb: torch.Tensor | None = None,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Each check's score of each input: images as ``image_statistics`` and embeddings,
        captions as text and embeddings."""
        out: dict[str, np.ndarray] = {}
        if pixels is not None and len(pixels):
            out["image_pixels"] = nearest(pixels, self.image_pixels, "pixels")
        if image_emb is not None and len(image_emb):
            out["image_embedding"] = nearest(image_emb, self.image_embedding, "embedding")
        if captions:
            out["caption_words"] = word_coverage(captions, set(self.vocabulary))
        if caption_emb is not None and len(caption_emb):
            out["caption_embedding"] = nearest(caption_emb, self.caption_embedding, "embedding")
        return out

    def warnings(self, scores: dict[str, np.ndarray], names: dict[str, list[str]]) -> list[str]:
        """One line per input that fails a check; ``names``: the inputs of each kind, in order."""
        failed: dict[tuple[str, int], list[str]] = {}
        for check, kind, higher_ok, meaning in CHECKS:
            if check not in scores or check not in self.thresholds:
                continue
            limit = self.thresholds[check]
            for i, score in enumerate(scores[check].tolist()):
                if (score < limit) if higher_ok else (score > limit):
                    sign = "<" if higher_ok else ">"
                    failed.setdefault((kind, i), []).append(
                        f"{meaning} ({check} {score:.3f} {sign} {limit:.3f})"
                    )
        return [
            f"{kind} {names[kind][i]!r} is out of the training distribution: {'; '.join(why)} "
            f"(each check passes {100 - self.percentile:g}% of validation {kind}s): the "
            "model's answer about this input is not reliable"
            for (kind, i), why in sorted(failed.items())
        ]

    def save(self, path: Path) -> None:
        """Write the profile as an .npz of plain arrays, atomically."""
        names = [c[0] for c in CHECKS]
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            np.savez(
                fh,
                image_pixels=self.image_pixels.numpy().astype(np.float32),
                image_embedding=self.image_embedding.numpy().astype(np.float16),
                caption_embedding=self.caption_embedding.numpy().astype(np.float16),
                vocabulary=np.array(sorted(self.vocabulary), dtype=str),
                checks=np.array(names, dtype=str),
                thresholds=np.array([self.thresholds.get(n, np.nan) for n in names]),
                percentile=np.array(self.percentile),
            )


def load_profile(path: str | Path) -> Profile:
    """Read a profile written by ``Profile.save`` (no pickles)."""
    with np.load(path, allow_pickle=False) as z:
        thresholds = {
            str(n): float(t) for n, t in zip(z["checks"], z["thresholds"], strict=True)
            if not np.isnan(t)
        }  # fmt: skip
        return Profile(
            torch.from_numpy(z["image_pixels"].astype(np.float32)),
            torch.from_numpy(z["image_embedding"].astype(np.float32)),
            torch.from_numpy(z["caption_embedding"].astype(np.float32)),
            frozenset(str(w) for w in z["vocabulary"]),
            thresholds,
            float(z["percentile"]),
        )


@dataclass
class _Split:
    """What a profile needs of one split: its images' histograms and embeddings, its captions."""

    pixels: torch.Tensor
    image_emb: torch.Tensor
    captions: list[str]
    caption_emb: torch.Tensor


@torch.no_grad()
def read_split(
    model: torch.nn.Module, shard_dir: Path, split: str, limit: int, batch_size: int = 256
) -> _Split:
    """Up to ``limit`` distinct images and ``limit`` captions of a split, measured."""
    from mmpipe.data import create_dataloader

    pixels, image_emb, caption_emb, captions = [], [], [], []
    seen: set[str] = set()
    for batch in create_dataloader(shard_dir, split, batch_size, shuffle_buffer=0):
        new = [i for i, key in enumerate(batch["image_id"]) if key not in seen]
        seen.update(batch["image_id"])  # augmented copies share their image's id
        if new and sum(len(p) for p in pixels) < limit:
            pixels.append(image_statistics(batch["image"][new]))
            image_emb.append(model.encode_image(batch["image"][new]).float())
        if len(captions) < limit:
            captions += list(batch["text"])
            caption_emb.append(model.encode_text(list(batch["text"])).float())
        if sum(len(p) for p in pixels) >= limit and len(captions) >= limit:
            break
    # embeddings are stored as float16: round now, so thresholds hold for what is stored
    half = [torch.cat(x)[:limit].half().float() if x else torch.empty(0, 0) for x in (image_emb, caption_emb)]  # fmt: skip
    pix = torch.cat(pixels)[:limit] if pixels else torch.empty(0, 0)
    return _Split(pix, half[0], captions[:limit], half[1])


def create_profile(model: torch.nn.Module, shard_dir: Path) -> Profile | None:
    """The training data's profile from the train and val shards; None without enough of them."""
    from mmpipe.manifest import read_manifest

    manifest = read_manifest(shard_dir)
    if not manifest.count("train") or not manifest.count("val"):
        log.info("no train or val shards: the model gets no training-distribution profile")
        return None
    model.eval()
    ref = read_split(model, shard_dir, "train", REFERENCE_LIMIT)
    val = read_split(model, shard_dir, "val", VALIDATION_LIMIT)
    if min(len(val.pixels), len(val.captions)) < MIN_VALIDATION:
        log.info(
            "fewer than %d validation inputs: no training-distribution profile", MIN_VALIDATION
        )
        return None
    vocabulary = frozenset(w for c in ref.captions for w in words(c))
    profile = Profile(ref.pixels, ref.image_emb, ref.caption_emb, vocabulary, {})
    scores = profile.scores(val.pixels, val.image_emb, val.captions, val.caption_emb)
    thresholds = {}
    for check, _, higher_ok, _ in CHECKS:
        q = PERCENTILE if higher_ok else 100 - PERCENTILE
        thresholds[check] = float(np.percentile(scores[check], q))
    log.info(
        "training-distribution thresholds: %s", {k: round(v, 3) for k, v in thresholds.items()}
    )
    return Profile(ref.pixels, ref.image_emb, ref.caption_emb, vocabulary, thresholds)
