"""The frozen-feature cache: a locked tower runs once per sample, not once per epoch.

With the image tower locked (LiT) and no online augmentation, what it computes for a stored
sample never changes, so training reads its features instead of decoding and encoding pixels
again every epoch (open_clip and LiT do the same with precomputed features). With only the
tower's last layer groups trainable (``unfreeze_last``), the locked prefix's output is cached
and the trainable groups run on it (``TokenEncoder.encode_from``). A locked text tower's pooled
features are cached the same way (not its tokens: a token-level head reads the text tower).

Image features are kept per image sample (the loader's ``sample_key``: one per image and copy,
whatever its number of captions), text features per caption row (``key``).

Keyed by content, like ingest's check cache: one file per (shard sha256, encoder digest) under
``cache_dir/<digest>/<sha256>.pt``; the digest covers the locked weights, how many groups are
cached, whether tokens are kept, the image size and decode of the shards. A shard set that
changes only in some shards (an incremental shard run) reuses the others' files; another
night with the same shards and encoder reuses them all. Every file is checked against the
manifest's sample count before use; a mismatch is rebuilt. Files hold tensors and lists only
(``torch.load(weights_only=True)``) and are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpipe.checkpoint import save_checkpoint
from mmpipe.data import TarSamples, decode_image, row_key, sample_pairs, split_shards
from mmpipe.errors import InputError
from mmpipe.manifest import Manifest
from mmpipe.model.features import CachedFeatures

log = logging.getLogger(__name__)

VERSION = 2  # bump when what a cache file holds changes (2: text rows per caption of a sample)


@dataclass
class Plan:
    """What to cache: the output of the ``tower`` encoder's first ``start`` layer groups (all of
    them: ``whole``), with the token grid when a head reads it."""

    start: int
    whole: bool
    tokens: bool
    tower: str = "image"  # or "text"

    def encoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's encoder this plan caches."""
        return model.image_encoder if self.tower == "image" else model.text_encoder


def text_plan(model: torch.nn.Module, mode: str) -> Plan | None:
    """The cache plan of a locked text tower (pooled features), or None: not locked, ``mode``
    "off", or a head that reads the text tokens (token-level fusion, captioning)."""
    if mode == "off" or not model.freeze_text:
        return None
    if model.decoder is not None or getattr(model.head, "token_level", False):
        return None
    groups = (
        model.text_encoder.layer_groups() if hasattr(model.text_encoder, "layer_groups") else []
    )
    return Plan(start=len(groups), whole=True, tokens=False, tower="text")


def plan(
    model: torch.nn.Module, mode: str, online_augment: bool, unfreeze_last: int
) -> Plan | None:
    """The cache plan of a model whose image tower is locked (fully, or all but its last
    ``unfreeze_last`` groups), or None: no lock, ``mode`` "off", or online augmentation (each
    epoch's pixels differ; ``mode`` "on" caches anyway, on the un-augmented pixels)."""
    if mode == "off" or not model.freeze_image:
        return None
    if online_augment and mode != "on":
        log.info("train: frozen-feature cache off: train.online_augment changes the pixels")
        return None
    encoder = model.image_encoder
    groups = len(encoder.layer_groups()) if hasattr(encoder, "layer_groups") else 0
    if unfreeze_last == 0:
        tokens = model.decoder is not None or getattr(model.head, "token_level", False)
        return Plan(start=groups, whole=True, tokens=bool(tokens))
    if not hasattr(encoder, "encode_from") or unfreeze_last >= groups:
        return None
    return Plan(start=groups - unfreeze_last, whole=False, tokens=False)


def encoder_digest(model: torch.nn.Module, p: Plan, manifest: Manifest) -> str:
    """sha256 over what the cached features depend on: the locked weights (and buffers, e.g.
    BatchNorm statistics), the plan, the shards' image size and decode (image) or the tokenizer
    (text), the format version."""
    h = hashlib.sha256()
    encoder = p.encoder(model)
    head = {"version": VERSION, "start": p.start, "whole": p.whole, "tokens": p.tokens,
            "tower": p.tower, "encoder": type(encoder).__name__}  # fmt: skip
    if p.tower == "image":
        head.update(image_size=manifest.image_size, decode=manifest.decode)
    else:
        head.update(max_tokens=getattr(encoder, "max_tokens", None),
                    max_length=getattr(encoder, "max_length", None),
                    vocab_size=getattr(encoder, "vocab_size", None))  # fmt: skip
        for spec in getattr(model, "hf_specs", {}).values():
            for name, data in sorted(spec.get("tokenizer_files", {}).items()):
                h.update(name.encode() + hashlib.sha256(data).digest())
    h.update(json.dumps(head, sort_keys=True).encode())
    state = encoder.state_dict()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def _encode(model: torch.nn.Module, p: Plan, inputs: Any) -> dict[str, torch.Tensor]:
    """The cached features of a batch of images (or texts): (B, ...) float32 on the CPU
    (exactly what the tower computes: a cached run trains as an uncached one would)."""
    encoder = p.encoder(model)
    if not p.whole:
        return {"x": encoder.encode_prefix(inputs, p.start).float().cpu()}
    enc = encoder.encode(inputs)
    out = {"x": enc.pooled.float().cpu()}
    if p.tokens:
        out["tokens"] = enc.tokens.float().cpu()
    return out


def _build_shard(
    model: torch.nn.Module,
    p: Plan,
    url: str,
    device: torch.device,
    batch: int,
    memo: dict[bytes, dict[str, torch.Tensor]],
) -> dict[str, Any]:
    """Encode one shard's images (a row per sample) or captions (a row per caption) -> {keys,
    rows, x[, tokens]}.

    An input is encoded once per build: ``memo`` (content digest -> features) carries what
    earlier shards of the same build encoded (the same caption or image bytes may recur)."""
    keys, digests, pending = [], [], {}
    for key, data in _inputs(url, p.tower):
        digest = hashlib.sha1(data).digest()
        if digest not in memo and digest not in pending:
            pending[digest] = decode_image(data) if p.tower == "image" else data.decode("utf-8")
            if len(pending) == batch:
                _encode_into(model, p, pending, device, memo)
        keys.append(key)
        digests.append(digest)
    _encode_into(model, p, pending, device, memo)
    order = list(dict.fromkeys(digests))  # this shard's distinct inputs, first-seen order
    row_of = {d: i for i, d in enumerate(order)}
    out: dict[str, Any] = {"keys": keys, "rows": torch.tensor([row_of[d] for d in digests])}
    for name in memo[order[0]] if order else ():
        out[name] = torch.stack([memo[d][name] for d in order])
    return out


def _inputs(url: str, tower: str) -> Any:
    """(key, bytes) of a shard's inputs: each sample's image under its sample key, or each
    caption under its row's key (``data.row_key``; shards of one sample per pair: the sample's)."""
    for sample in TarSamples()(iter([{"url": url}])):
        if tower == "image":
            yield sample["__key__"], sample["jpg"]
            continue
        meta = json.loads(sample["json"])
        if "pairs" not in meta:
            yield sample["__key__"], sample["txt"]
            continue
        for pair in sample_pairs(meta):
            key = row_key(sample["__key__"], pair["pair_id"], int(meta.get("copy", 0)))
            yield key, pair["caption"].encode("utf-8")


def _encode_into(
    model: torch.nn.Module,
    p: Plan,
    pending: dict[bytes, Any],
    device: torch.device,
    memo: dict[bytes, dict[str, torch.Tensor]],
) -> None:
    """Encode the ``pending`` inputs as one batch into ``memo``; empties ``pending``."""
    if not pending:
        return
    values = list(pending.values())
    inputs = torch.stack(values).to(device) if p.tower == "image" else values
    features = _encode(model, p, inputs)
    for i, digest in enumerate(pending):
        memo[digest] = {name: x[i] for name, x in features.items()}
    pending.clear()


class FeatureCache:
    """The cached features of one tower for the train and val splits, by sample key."""

    def __init__(self, p: Plan, files: list[dict[str, Any]]) -> None:
        self.plan = p
        self.index: dict[str, tuple[int, int]] = {}  # key -> (file, row)
        for f, data in enumerate(files):
            for key, row in zip(data["keys"], data["rows"].tolist(), strict=True):
                self.index[key] = (f, row)
        self.x = [data.get("x") for data in files]
        self.tokens = [data.get("tokens") for data in files]

    def lookup(self, keys: list[str], device: torch.device) -> CachedFeatures:
        """The features of the samples ``keys`` (a batch), as float32 on ``device``."""
        try:
            where = [self.index[k] for k in keys]
        except KeyError as exc:
            raise InputError(
                f"frozen-feature cache has no sample {exc}; delete the cache"
            ) from None
        x = torch.stack([self.x[f][r] for f, r in where]).float().to(device)
        tokens = None
        if self.plan.tokens:
            tokens = torch.stack([self.tokens[f][r] for f, r in where]).float().to(device)
        return CachedFeatures(self.plan.start, self.plan.whole, x, tokens)


def build(
    model: torch.nn.Module,
    p: Plan,
    shard_dir: Any,
    manifest: Manifest,
    cache_dir: Path,
    device: torch.device,
    splits: tuple[str, ...] = ("train", "val"),
    batch: int = 64,
) -> tuple[FeatureCache, dict[str, Any]]:
    """Load or compute the features of every shard of ``splits``; (cache, report)."""
    digest = encoder_digest(model, p, manifest)
    folder = cache_dir / digest[:32]
    files, built, reused = [], 0, 0
    started = time.perf_counter()
    encoder = p.encoder(model)
    training = encoder.training
    encoder.eval()
    memo: dict[bytes, dict[str, torch.Tensor]] = {}
    try:
        for split in splits:
            if not manifest.count(split):
                continue
            for ref, entry in zip(
                split_shards(shard_dir, split), manifest.splits[split].shards, strict=True
            ):
                path = folder / f"{entry.sha256}.pt"
                count = entry.count if p.tower == "image" or entry.pairs is None else entry.pairs
                data = _read(path, count)
                if data is None:
                    data = _build_shard(model, p, ref.url, device, batch, memo)
                    save_checkpoint(data, path)
                    built += 1
                    log.info("train: frozen-feature cache (%s tower): %s shard %s encoded "
                             "(%d distinct inputs so far, %.0f s)", p.tower, split,
                             Path(ref.url).name, len(memo), time.perf_counter() - started)  # fmt: skip
                else:
                    reused += 1
                files.append(data)
    finally:
        encoder.train(training)
    seconds = time.perf_counter() - started
    report = {"tower": p.tower, "digest": digest, "dir": str(folder), "shards_built": built,
              "shards_reused": reused, "cached_groups": p.start, "whole_tower": p.whole,
              "seconds": round(seconds, 3)}  # fmt: skip
    log.info("train: frozen-feature cache (%s tower) %s: %d shard(s) encoded, %d reused (%.1f s)",
             p.tower, folder, built, reused, seconds)  # fmt: skip
    return FeatureCache(p, files), report


def _read(path: Path, count: int) -> dict[str, Any] | None:
    """A cache file if it is whole and holds ``count`` samples (the manifest's), else None."""
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: rebuild it
        log.warning("train: frozen-feature cache file %s unreadable; rebuilding it", path)
        return None
    if not isinstance(data, dict) or len(data.get("keys", ())) != count:
        log.warning("train: frozen-feature cache file %s does not match the manifest", path)
        return None
    return data
