"""The served model's contract (``mlflow models serve``): what a request holds, what comes back.

    in   rows of  image    the image file's bytes, base64-encoded (a string; never a path)
                  caption  text
    out  a row each: label, label_index, confidence (null where the task has none), similarity,
                     warnings (why the model's answer about this row's inputs is not reliable:
                     mmpipe.ood's checks against the training data)

A served model reads nothing but the request: a string that is not base64 is refused, never
looked up on the server's disk. A bad row is an ``InputError`` of one line naming the row (the
pyfunc in ``mmpipe.tracking.models`` turns it into an HTTP 400 without a stack trace).

Pure library code (no MLflow): ``mmpipe.tracking.models`` wraps it as the logged pyfunc.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmpipe.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from mmpipe.predict import Predictor

COLUMNS = ("image", "caption")
OUTPUTS = ("label", "label_index", "confidence", "similarity", "warnings")
MAX_ROWS = 64  # per request: each row is a forward pass on the server's CPU
NO_PROFILE = "no training-data profile with this model: its inputs are not checked"
_SPLITS = ("train", "val", "test")  # where the input example is taken from, first found


def decode_image_cell(value: Any, row: int) -> bytes:
    """A request's ``image`` cell -> the image file's bytes; anything but base64 is refused."""
    if isinstance(value, bytes | bytearray):  # (an in-process caller's DataFrame)
        return bytes(value)
    if not isinstance(value, str):
        raise InputError(f"row {row}: image must be a base64 string, not {type(value).__name__}")
    try:
        data = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(
            f"row {row}: image is not base64 data (send the image file's bytes base64-encoded; "
            "the server never reads a path)"
        ) from None
    if not data:
        raise InputError(f"row {row}: image is empty")
    return data


def check_frame(frame: pd.DataFrame) -> None:
    """InputError unless ``frame`` has the columns and at most ``MAX_ROWS`` rows."""
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"input lacks column(s) {missing}; expected {list(COLUMNS)}")
    if not 0 < len(frame) <= MAX_ROWS:
        raise InputError(f"{len(frame)} rows: send 1 to {MAX_ROWS} rows per request")


def predict_rows(predictor: Predictor, frame: pd.DataFrame) -> pd.DataFrame:
    """The served prediction: one output row (``OUTPUTS``) per input row, warnings included."""
    import pandas as pd

    check_frame(frame)
    out = [
        _predict_row(predictor, decode_image_cell(image, i), caption, i)
        for i, (image, caption) in enumerate(zip(frame["image"], frame["caption"], strict=True))
    ]
    columns = {k: pd.Series([row[k] for row in out], dtype=object) for k in OUTPUTS}
    return pd.DataFrame(columns)


def _predict_row(predictor: Predictor, image: bytes, caption: Any, row: int) -> dict[str, Any]:
    """One (image bytes, caption) pair's prediction; a bad input names its row."""
    if not isinstance(caption, str):
        raise InputError(f"row {row}: caption must be a string, not {type(caption).__name__}")
    try:
        result = predictor.classify_pairs([image], [caption])[0]
        warnings = predictor.input_warnings([image], [caption])
    except InputError as exc:
        raise InputError(f"row {row}: {exc}") from None
    confidence = result.get("confidence")
    return {
        "label": str(result["label"]),
        "label_index": int(result["label_index"]),
        "confidence": None if confidence is None else float(confidence),
        "similarity": float(result["similarity"]),
        "warnings": warnings if predictor.profile is not None else [NO_PROFILE],
    }


def example_frame(shard_dir: str | Path) -> pd.DataFrame:
    """The logged model's input example: the first stored sample of the training data (its
    image as the shards hold it, base64, and its caption)."""
    import pandas as pd

    from mmpipe.data import iterate_split
    from mmpipe.manifest import read_manifest

    manifest = read_manifest(shard_dir)
    for split in (s for s in _SPLITS if manifest.count(s)):
        for sample in iterate_split(shard_dir, split):
            image = base64.b64encode(sample["jpg"]).decode("ascii")
            return pd.DataFrame({"image": [image], "caption": [sample["txt"]]})
    raise InputError(f"{shard_dir}: no stored sample to take the model's input example from")


def encode_image_file(path: str | Path) -> str:
    """A client's side of the contract: an image file as the ``image`` cell of a request."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")
