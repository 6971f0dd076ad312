"""albumentations pipelines from params (`TransformSpec` lists), applied reproducibly per seed."""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
from albumentations.core.transforms_interface import BasicTransform

from mmpipe.config import TransformSpec
from mmpipe.errors import InputError

# albumentations 2.x renamed arguments that old configs still use
_V2_HINT = (
    "albumentations 2.x API: RandomResizedCrop(size=(h, w)) not height/width, no always_apply, "
    "value/cval -> fill, mode -> border_mode, GaussNoise(std_range=[lo, hi]) not var_limit"
)


def _transform_names() -> list[str]:
    """Every public albumentations transform class name (for 'did you mean' hints)."""
    return sorted(
        n
        for n, obj in vars(A).items()
        if isinstance(obj, type) and issubclass(obj, BasicTransform) and not n.startswith("_")
    )


def create_transform(spec: TransformSpec | dict[str, Any]) -> BasicTransform:
    """One albumentations transform from ``{name, params}``; bad names/kwargs raise InputError."""
    spec = TransformSpec.model_validate(spec)
    cls = getattr(A, spec.name, None)
    if not (isinstance(cls, type) and issubclass(cls, BasicTransform)):
        close = difflib.get_close_matches(spec.name, _transform_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"augment: {spec.name!r} is not an albumentations transform{hint}")
    try:
        # strict=True: unknown kwargs raise instead of albumentations' default warning
        return cls(**spec.params, strict=True)
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise InputError(
            f"augment: {spec.name}({spec.params}) is invalid: {reason} ({_V2_HINT})"
        ) from None


def create_augment(specs: Sequence[TransformSpec | dict[str, Any]]) -> A.Compose | None:
    """A Compose of the given transforms, or None when the list is empty (no augmentation)."""
    if not specs:
        return None
    return A.Compose([create_transform(s) for s in specs], seed=0)


def derive_seed(*parts: object) -> int:
    """A 32-bit seed from any parts (stable across processes, unlike hash())."""
    text = ":".join(str(p) for p in parts)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def apply_augment(compose: A.Compose | None, image: np.ndarray, seed: int) -> np.ndarray:
    """Augment a uint8 (H, W, 3) image; the same seed gives the same output in any process."""
    if compose is None:
        return image
    compose.set_random_seed(seed)  # reseeds every child transform: no dependence on call history
    return compose(image=image)["image"]
