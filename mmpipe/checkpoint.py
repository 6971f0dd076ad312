"""What train writes and evaluate, predict and register read back: checkpoints.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it (no pickled objects):

    model           the raw module's state_dict
    model_args      the ModelConfig that rebuilds it (nanoGPT keeps model_args beside the weights)
    params          the whole train section it was trained with (seed, task, ...)
    classes, num_classes, image_size, task, model_config, params_hash
    caption         captioning only: the decoder's vocabulary and max length (words)
    hf              Hugging Face parts only: per role (dual, vision, text) the architecture config,
                    the tokenizer's files and the preprocessing (``mmpipe.model.hf.HFSpec``)
    step, epoch, batch_in_epoch, best_metric, history
    + in last.pt (exact resume): optimizer, scheduler, scaler, rng, epoch_sums

``models/`` holds ``best.pt`` (best validation metric) and ``last.pt`` (every epoch); readers take
best, else last. (The shard manifest they were trained on: ``mmpipe.manifest``.)
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch

from mmpipe.commit import disk_full
from mmpipe.config import ModelConfig
from mmpipe.errors import InputError
from mmpipe.io import atomic_path
from mmpipe.model import MultimodalModel, create_model

BEST, LAST = "best.pt", "last.pt"
# what only resuming needs; load_model's info leaves it out
RESUME_STATE = ("optimizer", "scheduler", "scaler", "rng", "epoch_sums")


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save through a temp file renamed over ``path`` (never a half-written checkpoint).

    A full disk is a DiskFull naming the file and the bytes it needs (torch.save to a path hides
    the errno in a RuntimeError; through a Python file object the OSError comes out).
    """
    try:
        with atomic_path(path) as tmp, tmp.open("wb") as fh:
            torch.save(state, fh)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        kept = "the previous checkpoint and the installed model are intact"
        raise disk_full(path, _tensor_bytes(state), intact=kept) from None


def _tensor_bytes(tree: Any) -> int:
    """Bytes of the tensors in a nested state (what a checkpoint of it needs, give or take)."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True) with user-facing errors."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types; all mean "not ours"
        raise InputError(f"{path}: not a loadable mmpipe checkpoint ({exc})") from None
    if not isinstance(state, dict) or "model" not in state or "params" not in state:
        raise InputError(f"{path}: not an mmpipe checkpoint (no 'model'/'params' entries)")
    return state


def pick_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as is; in a directory (``models/``), best.pt, else last.pt."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(
            f"{path}: not found; expected a checkpoint file or a directory with best.pt or "
            "last.pt (run `mmpipe train` first)"
        )
    for name in (BEST, LAST):
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: no best.pt or last.pt checkpoint: run `mmpipe train` first")


def model_args(state: dict[str, Any]) -> ModelConfig:
    """The ModelConfig stored in a checkpoint.

    Checkpoints written before ``model_args`` existed (e.g. an older registered champion) carry
    only ``params``, whose model fields are the same.
    """
    args = state.get("model_args")
    if args is None:
        args = {k: v for k, v in state["params"].items() if k in ModelConfig.model_fields}
    return ModelConfig.model_validate(_legacy_fusion(args, state.get("model", {})))


def _legacy_fusion(args: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """``cross_attention`` was the pooled head until it became token-level: a checkpoint whose
    weights are the pooled head's (``head.attn.*``) rebuilds as ``cross_attention_pooled``."""
    if args.get("fusion") == "cross_attention" and "head.attn.in_proj_weight" in weights:
        return {**args, "fusion": "cross_attention_pooled"}
    return args


def load_model(path: str | Path) -> tuple[MultimodalModel, dict[str, Any]]:
    """Rebuild the model from a checkpoint's model_args + weights: (model in eval mode, info).

    ``info`` is the checkpoint without weights and resume state, with ``model_args`` filled in.
    """
    state = read_checkpoint(path)
    cfg = model_args(state)
    # Hugging Face parts are rebuilt from the specs stored with the weights: no hub, no path
    model = create_model(
        cfg, int(state.get("num_classes", 0)), state.get("caption"), hf=state.get("hf") or {}
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not match the stored model_args ({exc})") from None
    info = {k: v for k, v in state.items() if k != "model" and k not in RESUME_STATE}
    info["model_args"] = cfg.model_dump(mode="json")
    return model.eval(), info
