"""MLflow tracking and registry: the ONLY mmpipe module that imports mlflow.

Where runs go: ``MLFLOW_TRACKING_URI`` (env) > ``tracking.uri`` (params) > the default
``sqlite:///<project>/.mmpipe/mlflow.db`` (absolute), with artifacts in
``<project>/.mmpipe/mlartifacts``. For any sqlite URI the experiment's artifacts go to
``mlartifacts/`` beside the database file, never to the current directory.

Runs nest across processes: a flow starts the parent with ``start_run(..., run_name="nightly")``
and hands its run id to each stage, either explicitly (``parent_run_id=``) or through the
environment variable ``MMPIPE_PARENT_RUN_ID`` (which ``start_run(..., export_parent=True)`` sets
for child processes). Each stage then opens its own nested run.

Models are logged as an MLflow *pyfunc* "model from code": the artifact holds the training
checkpoint (plain tensors, loaded with ``torch.load(weights_only=True)``), a JSON sidecar
(image size, classes) and a three-line loader script. Nothing is pickled, so loading never needs
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` (mlflow.pytorch would pickle the module, or trace it to pt2,
which cannot take the list[str] captions). The pyfunc takes a DataFrame with string columns
``image`` (base64-encoded image bytes, or a local file path) and ``caption``.

The registry uses aliases only (stages are deprecated): ``register_and_maybe_promote`` moves the
alias when the new version's metric beats the champion version's tagged metric.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mmpipe.config import Params, RegisterParams, TrackingParams, flatten
from mmpipe.errors import InputError
from mmpipe.io import read_json

log = logging.getLogger(__name__)

PARENT_ENV = "MMPIPE_PARENT_RUN_ID"
DEFAULT_MODEL_URI = "models:/mmpipe-fusion@champion"
SIDECAR = "mmpipe_model.json"
CHECKPOINT_ARTIFACT = "checkpoint"
SIDECAR_ARTIFACT = "sidecar"
_LOADER_SCRIPT = (
    "import mlflow\n"
    "from mmpipe.tracking import FusionPyfunc\n"
    "mlflow.models.set_model(FusionPyfunc())\n"
)
_initialised: set[tuple[str, str]] = set()
# mlflow.set_tracking_uri() also *exports* MLFLOW_TRACKING_URI (for its subprocesses). That value is
# ours, not the user's choice: remember it, so a second project in the same process (tests, the
# benchmarks, a notebook) is not silently logged into the first project's store.
_ENV_AT_IMPORT = os.environ.get("MLFLOW_TRACKING_URI")
_exported_by_us: str | None = None


def _user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and (env != _exported_by_us or env == _ENV_AT_IMPORT):
        return env
    return None


def _set_uris(uri: str) -> None:
    global _exported_by_us
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _exported_by_us = os.environ.get("MLFLOW_TRACKING_URI")


# --------------------------------------------------------------------------- setup


def tracking_uri(p: TrackingParams | None, root: str | Path) -> str:
    """The tracking URI: env MLFLOW_TRACKING_URI, else params, else the project's sqlite DB.

    A relative sqlite path in params (``sqlite:///x.db``) is taken relative to ``root``.
    """
    if env := _user_env_uri():
        return env
    if p is not None and p.uri:
        db = _sqlite_path(p.uri)
        if db is not None and not db.is_absolute():  # relative to the project, never the cwd
            return f"sqlite:///{(Path(root).resolve() / db).as_posix()}"
        return p.uri
    return f"sqlite:///{(Path(root).resolve() / '.mmpipe' / 'mlflow.db').as_posix()}"


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if path in ("", ":memory:") else Path(path)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside the DB file; a server decides for itself."""
    db = _sqlite_path(uri)
    return (db.resolve().parent / "mlartifacts").as_uri() if db is not None else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive cross-process lock (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def init_tracking(p: TrackingParams | None, root: str | Path) -> str:
    """Point MLflow at the store, create DB + experiment once (under a file lock); experiment id.

    Call it before launching parallel workers: SQLite's first-start schema migration races when
    several processes start at once (TRAPS.md, mlflow#6490). The flock serialises the creation
    across processes; later calls in this process are cheap.
    """
    p = p or TrackingParams()
    uri = tracking_uri(p, root)
    _set_uris(uri)
    if (uri, p.experiment) not in _initialised:
        db = _sqlite_path(uri)
        lock = _file_lock(db.with_name(db.name + ".lock")) if db else contextlib.nullcontext()
        with lock:  # the first store access migrates the schema: keep every access inside
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # tracking store tables
            client.search_registered_models(max_results=1)  # registry store tables
            _ensure_experiment(client, p.experiment, artifact_location(uri))
        _initialised.add((uri, p.experiment))
    exp = MlflowClient(uri, registry_uri=uri).get_experiment_by_name(p.experiment)
    mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def _ensure_experiment(client: MlflowClient, name: str, location: str | None) -> None:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        with contextlib.suppress(MlflowException):  # another process won the race
            client.create_experiment(name, artifact_location=location)
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)


# --------------------------------------------------------------------------- runs


@contextlib.contextmanager
def start_run(
    p: TrackingParams | None,
    root: str | Path,
    *,
    run_name: str,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    export_parent: bool = False,
) -> Iterator[str]:
    """Open a run (nested under ``parent_run_id`` or env MMPIPE_PARENT_RUN_ID); yields its id.

    With ``export_parent=True`` the run id is put in MMPIPE_PARENT_RUN_ID for the duration, so
    stages started as subprocesses nest under it. A failure inside marks the run FAILED.
    """
    experiment_id = init_tracking(p, root)
    parent = parent_run_id or os.environ.get(PARENT_ENV) or None
    active = mlflow.active_run()
    if active is not None and parent is not None and parent != active.info.run_id:
        raise RuntimeError(
            f"cannot nest run {run_name!r} under {parent}: run {active.info.run_id} is active"
        )
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=run_name,
        parent_run_id=parent,
        nested=active is not None,
        tags=dict(tags or {}),
    ) as run:
        run_id = run.info.run_id
        saved = os.environ.get(PARENT_ENV)
        if export_parent:
            os.environ[PARENT_ENV] = run_id
        try:
            yield run_id
        finally:
            if export_parent:
                if saved is None:
                    os.environ.pop(PARENT_ENV, None)
                else:
                    os.environ[PARENT_ENV] = saved


def open_parent_run(
    p: TrackingParams | None,
    root: str | Path,
    params: Params | None = None,
    *,
    run_name: str = "nightly",
) -> str:
    """Create (not activate) a flow's parent run and return its id; stages nest under it by id.

    It stays RUNNING across tasks and processes until ``close_parent_run``. Creating it also
    creates the SQLite DB, before any stage runs in parallel.
    """
    experiment_id = init_tracking(p, root)
    run = MlflowClient().create_run(experiment_id, run_name=run_name, tags={"mmpipe.kind": "flow"})
    if params is not None:
        log_params_flat(params, run_id=run.info.run_id)
    return run.info.run_id


def close_parent_run(
    p: TrackingParams | None,
    root: str | Path,
    run_id: str,
    status: str = "FINISHED",
    summary: str = "",
) -> None:
    """End a parent run with ``status`` (FINISHED / FAILED / KILLED), keeping ``summary.txt``."""
    init_tracking(p, root)
    client = MlflowClient()
    if summary:
        client.log_text(run_id, summary, "summary.txt")
    client.set_terminated(run_id, status=status)


def git_commit(path: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the code (read-only); "unknown" outside a git checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def log_params_flat(
    params: Params, extra: Mapping[str, Any] | None = None, *, run_id: str | None = None
) -> dict[str, Any]:
    """Log flattened params + ``git.commit`` + ``extra`` (e.g. the data manifest hash)."""
    flat: dict[str, Any] = flatten(params)
    flat["git.commit"] = git_commit()
    flat.update(extra or {})
    values = {k: "null" if v is None else str(v) for k, v in flat.items()}
    run_id = run_id or _active_run_id()
    client = MlflowClient()
    items = [Param(k, v) for k, v in sorted(values.items())]
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)
    return flat


def _active_run_id() -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run: pass run_id= or call inside start_run()")
    return run.info.run_id


def _numeric(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested dicts to dotted keys, keeping finite numbers (bools excluded)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_numeric(value, f"{name}."))
        elif (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        ):
            out[name] = float(value)
    return out


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> int:
    """Log every finite numeric value of ``metrics`` in batched calls; returns how many."""
    ts = int(time.time() * 1000)
    items = [Metric(k, v, ts, step or 0) for k, v in _numeric(metrics).items()]
    client = MlflowClient()
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)
    return len(items)


def epoch_logger(run_id: str) -> Callable[[int, Mapping[str, Any]], None]:
    """A callback ``(epoch, metrics)`` logging one epoch's metrics in ONE log_batch call."""
    client = MlflowClient()

    def on_epoch_end(epoch: int, metrics: Mapping[str, Any]) -> None:
        ts = int(time.time() * 1000)
        items = [Metric(k, v, ts, int(epoch)) for k, v in _numeric(metrics).items()]
        if items:
            client.log_batch(run_id, metrics=items, synchronous=True)

    return on_epoch_end


def log_artifacts(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents to the run's artifacts."""
    path = Path(path)
    client = MlflowClient()
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    elif path.is_file():
        client.log_artifact(run_id, str(path), artifact_path)
    else:
        raise InputError(f"{path}: no such file or directory to log as an MLflow artifact")


def log_stage_run(
    p: TrackingParams | None,
    root: str | Path,
    *,
    stage: str,
    parent_run_id: str,
    section: Mapping[str, Any],
    report: Mapping[str, Any],
    report_file: str | Path | None = None,
) -> str:
    """Record a finished data stage as a run nested under the flow's run; returns its id.

    Params = the stage's params section (flattened, ``<stage>.`` prefix), metrics = the numeric
    counts of its report (``seen``, ``accepted``, ...), artifact = its report file.
    """
    init_tracking(p, root)
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id,
        run_name=stage,
        tags={"mlflow.parentRunId": parent_run_id, "mmpipe.kind": "stage", "mmpipe.stage": stage},
    )
    run_id = run.info.run_id
    flat: dict[str, Any] = {}
    _flatten_params(flat, stage, section)
    items = [Param(k, "null" if v is None else str(v)[:6000]) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)
    log_metrics(run_id, report)
    if report_file is not None and Path(report_file).is_file():
        client.log_artifact(run_id, str(report_file))
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _flatten_params(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, Mapping) and value:
        for k, v in value.items():
            _flatten_params(out, f"{key}.{k}", v)
    elif isinstance(value, list | dict):
        out[key] = json.dumps(value, sort_keys=True)
    else:
        out[key] = value


def log_evaluation(
    p: TrackingParams | None,
    root: str | Path,
    run_id: str,
    metrics: Mapping[str, Any],
    eval_dir: str | Path,
) -> None:
    """Log evaluation metrics (prefixed ``test.``) and the reports directory to ``run_id``."""
    init_tracking(p, root)
    log_metrics(run_id, {"test": dict(metrics)})
    if Path(eval_dir).is_dir():
        log_artifacts(run_id, eval_dir, "evaluation")


# --------------------------------------------------------------------------- model


# MLflow warns at class creation that ``predict`` has no type hints; that is deliberate (it would
# read them as the input schema; the signature comes from the input example instead). Its own
# decorator resets the warning filters, so the warning is recorded and dropped instead.
with warnings.catch_warnings(record=True):

    class FusionPyfunc(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper of ``mmpipe.predict.Predictor``: (image, caption) rows -> predictions."""

        def load_context(self, context: Any) -> None:
            """Load the checkpoint (weights only) and the sidecar."""
            from mmpipe.predict import load_predictor

            sidecar = read_json(context.artifacts[SIDECAR_ARTIFACT])
            self.predictor = load_predictor(
                Path(context.artifacts[CHECKPOINT_ARTIFACT]),
                image_size=sidecar.get("image_size"),
                classes=sidecar.get("classes"),
            )

        def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as schema
            """DataFrame[image, caption] -> DataFrame[label, label_index, confidence, similarity]."""
            return self.predictor.predict_frame(model_input)


def image_to_base64(path: str | Path) -> str:
    """The pyfunc's ``image`` column format: base64 of the file's bytes."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _example_frame(image_size: int) -> Any:
    import pandas as pd
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (200, 80, 40)).save(buf, format="PNG")
    return pd.DataFrame(
        {
            "image": [base64.b64encode(buf.getvalue()).decode("ascii")],
            "caption": ["a red circle on the left"],
        }
    )


def log_model(
    checkpoint: str | Path,
    *,
    run_id: str | None = None,
    name: str = "model",
    image_size: int | None = None,
    classes: list[str] | None = None,
    project_dir: str | Path = ".",
) -> str:
    """Log a checkpoint as the pyfunc model (signature + input example); returns its model URI.

    Image size and class names come from the arguments, else the checkpoint, else the project's
    shard manifest; they are frozen into the model's sidecar.
    """
    from mmpipe.predict import load_predictor

    checkpoint = Path(checkpoint)
    predictor = load_predictor(
        checkpoint, project_dir=project_dir, image_size=image_size, classes=classes
    )
    example = _example_frame(predictor.image_size)
    with warnings.catch_warnings():  # label_index is an int output and never missing
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
        signature = mlflow.models.infer_signature(example, predictor.predict_frame(example))
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Path(tmp) / SIDECAR
        sidecar.write_text(json.dumps(predictor.describe(), sort_keys=True), encoding="utf-8")
        script = Path(tmp) / "mmpipe_pyfunc.py"
        script.write_text(_LOADER_SCRIPT, encoding="utf-8")
        with _resumed(run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(script),
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), SIDECAR_ARTIFACT: str(sidecar)},
                signature=signature,
                input_example=example,
                pip_requirements=[],  # the model runs inside the mmpipe environment
            )
    return info.model_uri


def _resumed(run_id: str | None) -> contextlib.AbstractContextManager[Any]:
    """Make ``run_id`` the active run for fluent calls, unless it already is (or is None)."""
    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        return contextlib.nullcontext()
    return mlflow.start_run(run_id=run_id, nested=active is not None)


def load_pyfunc(model_uri: str) -> Any:
    """Load a logged model as an MLflow pyfunc (``.predict(DataFrame)``)."""
    return mlflow.pyfunc.load_model(model_uri)


def download_model(
    model_uri: str, p: TrackingParams | None = None, root: str | Path = "."
) -> tuple[Path, dict[str, Any]]:
    """Fetch a logged model's checkpoint + sidecar (no pickle, no code run); (checkpoint, sidecar)."""
    init_tracking(p, root)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    except MlflowException as exc:
        raise InputError(f"cannot fetch model {model_uri}: {exc.message}") from None
    sidecars = sorted(local.rglob(SIDECAR))
    checkpoints = sorted(local.rglob("*.pt"))
    if not sidecars or not checkpoints:
        raise InputError(f"{model_uri} is not an mmpipe model (no {SIDECAR} or *.pt checkpoint)")
    return checkpoints[0], read_json(sidecars[0])


def try_download_model(
    model_uri: str, p: TrackingParams | None = None, root: str | Path = "."
) -> tuple[Path, dict[str, Any]] | None:
    """Like ``download_model`` but None when there is no store or no such model.

    A missing default SQLite file is not created just to find out it is empty.
    """
    db = _sqlite_path(tracking_uri(p, root))
    if db is not None and not db.is_file():
        return None
    try:
        return download_model(model_uri, p, root)
    except (InputError, MlflowException) as exc:
        log.debug("%s unavailable: %s", model_uri, exc)
        return None


# --------------------------------------------------------------------------- registry


def _champion(client: MlflowClient, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _champion_value(version: Any, metric: str) -> float | None:
    tag = version.tags.get(metric)
    return float(tag) if tag is not None else None


def _is_better(new: float, old: float | None, greater_is_better: bool) -> bool:
    if old is None or math.isnan(old):
        return True
    return new > old if greater_is_better else new < old


def register_and_maybe_promote(
    run_id: str,
    model_uri: str,
    metrics: Mapping[str, Any],
    p: RegisterParams,
    *,
    data_hash: str | None = None,
) -> dict[str, Any]:
    """New version of ``p.model_name`` tagged with metrics; alias moves only if it beats the champion.

    The first version becomes champion. The comparison reads the champion version's own
    tag named after the metric (what it scored when registered); a champion without that tag is replaced.
    A tie does not move the alias. Both scores should come from the same test split: when the
    champion's ``data_hash`` tag differs, the result says so (``same_data: false``) and a warning
    is logged, but the comparison still decides.
    """
    numeric = _numeric(metrics)
    if p.metric not in numeric:
        raise InputError(
            f"metrics have no numeric {p.metric!r} (register.metric); available: {sorted(numeric)}"
        )
    value = numeric[p.metric]
    client = MlflowClient()
    champion = _champion(client, p.model_name, p.alias)
    tags = {k: repr(v) for k, v in numeric.items()}
    tags.update({"run_id": run_id, "data_hash": data_hash or "unknown"})
    version = mlflow.register_model(model_uri, p.model_name, tags=tags)
    old = _champion_value(champion, p.metric) if champion is not None else None
    promoted = _is_better(value, old, p.greater_is_better)
    same_data = champion is None or champion.tags.get("data_hash") == (data_hash or "unknown")
    if not same_data:
        log.warning("champion v%s was scored on other data; comparing anyway", champion.version)
    if promoted:
        client.set_registered_model_alias(p.model_name, p.alias, version.version)
    log.info(
        "registered %s v%s (%s=%.4f, champion %s): %s",
        p.model_name,
        version.version,
        p.metric,
        value,
        old,
        "promoted" if promoted else "alias unchanged",
    )
    return {
        "model_name": p.model_name,
        "version": int(version.version),
        "model_uri": model_uri,
        "alias": p.alias,
        "promoted": promoted,
        "metric": p.metric,
        "value": value,
        "previous_champion_version": int(champion.version) if champion is not None else None,
        "previous_champion_value": old,
        "champion_version": int(version.version) if promoted else int(champion.version),
        "same_data": same_data,
    }


def register_trained_model(
    p: TrackingParams | None,
    root: str | Path,
    *,
    run_id: str,
    model_dir: str | Path,
    metrics: Mapping[str, Any],
    register: RegisterParams,
    data_hash: str | None = None,
) -> dict[str, Any]:
    """Log models/best.pt (else last.pt) to ``run_id``, register it and maybe promote it."""
    init_tracking(p, root)
    checkpoint = _pick_checkpoint(Path(model_dir))
    model_uri = log_model(checkpoint, run_id=run_id, name="model", project_dir=root)
    return register_and_maybe_promote(run_id, model_uri, metrics, register, data_hash=data_hash)


def _pick_checkpoint(model_dir: Path) -> Path:
    for name in ("best.pt", "last.pt"):
        if (model_dir / name).is_file():
            return model_dir / name
    raise InputError(f"{model_dir}: no best.pt or last.pt checkpoint: run `mmpipe train` first")
