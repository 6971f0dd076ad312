"""The DAG in one place: each stage's params, code, inputs and outputs, and where they live.

``STAGES`` is the one declaration of what a stage depends on, in the DAG's order (which
``pipeline.ORDER`` and the flow follow). ``dvc.yaml`` lists the same (``tests/unit/test_layout.py``
checks it, key for key; ``tests/unit/test_stage_deps.py`` checks the code against the imports),
the nightly flow's cache fingerprints the code and inputs it names (``mmpipe.pipeline``), and
``mmpipe <stage> --help`` lists its params sections.
``Layout`` turns the declaration into paths under one project directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class StageSpec:
    """One stage of the DAG, as ``dvc.yaml`` declares it (paths relative to the project)."""

    help: str
    params: tuple[str, ...]  # params.yaml sections that shape its outputs (dvc.yaml `params:`)
    # every mmpipe module its driver runs, lazy imports included (dvc.yaml `deps:`; a directory
    # stands for its Python files): tests/unit/test_stage_deps.py checks it on the imports
    code: tuple[str, ...]
    inputs: tuple[str, ...]  # earlier stages' outputs it reads (dvc.yaml `deps:`)
    out: str | None  # its output directory (dvc.yaml `outs:`); None: it writes to MLflow only
    tracked: bool = False  # logs to MLflow, so it also reads the `tracking` section
    # params keys it reads for WHERE an input is, not what it holds (not in dvc.yaml `params:`:
    # the data they name is pinned by content, e.g. shard.output's version by the manifest sha256)
    locations: tuple[str, ...] = ()


def _code(*groups: tuple[str, ...]) -> tuple[str, ...]:
    """A stage's code deps: the union of module groups, sorted (as dvc.yaml lists them); a bare
    name is ``mmpipe/<name>`` (a directory stands for its Python files)."""
    return tuple(sorted({f"mmpipe/{name}" for group in groups for name in group}))


# what every stage's driver imports: the pipeline, params, the atomic commit, the layout itself
_COMMON = (
    "__init__.py", "align.py", "commit.py", "config.py", "errors.py", "faults.py", "io.py",
    "keys.py", "layout.py", "lock.py", "manifest.py", "objectives.py", "pipeline.py",
    "storage.py", "taskspec.py",
)  # fmt: skip
# reading a source or its originals
_READ = ("audio.py", "incremental.py", "ingest.py", "metrics.py", "parallel.py", "progress.py",
         "synthetic.py")  # fmt: skip
_SHARDING = ("augment.py", "shard.py")
# loading a model to score with it (curate's scorer; train, evaluate and register)
_MODEL = ("checkpoint.py", "data.py", "model", "modelcard.py", "ood.py", "predict.py", "tracking")
_TRAINING = ("distributed.py", "featurecache.py", "serving.py", "signals.py", "train.py")
_EVALUATING = ("captioning.py", "evaluate.py", "plots.py", "publish.py", "report.py", "scoring.py")


STAGES: dict[str, StageSpec] = {
    "ingest": StageSpec(
        help="read a source, validate every record, write records + rejects",
        params=("ingest",),
        code=_code(_COMMON, _READ),
        inputs=(),  # the user's source files, named by params (see pipeline.stage_fingerprint)
        out="data/ingest",
    ),
    "curate": StageSpec(
        help="group near-duplicate images, score image-text agreement, filter pairs",
        params=("curate",),
        code=_code(_COMMON, _READ, _SHARDING, _MODEL, ("curate.py",)),
        # the images are read under the data root ingest's report names
        inputs=(
            "data/ingest/records.parquet",
            "data/ingest/images.parquet",
            "data/ingest/report.json",
        ),
        out="data/curate",
        # curate.scorer `champion`: which registered model it names (pinned by the scorer's
        # sha256 in the stage's fingerprint and report, not by these keys)
        locations=("register.model_name", "register.alias"),
    ),
    "align": StageSpec(
        help="pair images and captions, count orphans, split by image group",
        params=("align",),
        code=_code(_COMMON),
        inputs=("data/curate/records.parquet", "data/curate/images.parquet"),
        out="data/align",
    ),
    "shard": StageSpec(
        help="augment + write WebDataset shards and manifest.json",
        params=("shard",),
        code=_code(_COMMON, _READ, _SHARDING),
        # the images themselves are named by pairs.parquet's content-hash image ids; the data
        # root they live under is in ingest's report
        inputs=("data/align/pairs.parquet", "data/align/report.json", "data/ingest/report.json"),
        out="data/shards",
    ),
    "train": StageSpec(
        help="train the dual encoder + fusion classifier",
        params=("train",),
        code=_code(_COMMON, _READ, _SHARDING, _MODEL, _TRAINING),
        inputs=("data/shards",),
        out="models",
        tracked=True,
        locations=("shard.output",),
    ),
    "evaluate": StageSpec(
        help="retrieval, classification, ablation",
        # the model, the task and the ablation's seed come from the checkpoint, not params.train
        params=("evaluate",),
        code=_code(_COMMON, _READ, _SHARDING, _MODEL, _TRAINING, _EVALUATING),
        inputs=("models", "data/shards"),
        out="reports",
        tracked=True,
        locations=("shard.output",),
    ),
    "register": StageSpec(
        help="register the model; promote if it beats the champion",
        params=("register",),
        code=_code(_COMMON, _READ, _SHARDING, _MODEL, _TRAINING, _EVALUATING),
        inputs=("models", "reports/metrics.json", "data/shards/manifest.json"),
        out=None,
        tracked=True,
        locations=("shard.output",),
    ),
}


def _stage_dir(stage: str, doc: str) -> property:
    return property(lambda layout: layout.stage_dir(stage), doc=doc)


def _state_path(name: str, doc: str) -> property:
    return property(lambda layout: layout.state_dir / name, doc=doc)


@dataclass(frozen=True)
class Layout:
    """Where every stage reads and writes under one project directory ``root``."""

    root: Path = Path(".")

    def stage_dir(self, stage: str) -> Path:
        """The output directory of ``stage`` (``STAGES[stage].out``)."""
        out = STAGES[stage].out
        if out is None:
            raise ValueError(f"stage {stage!r} writes no files (its output is in MLflow)")
        return self.root / out

    def inputs(self, stage: str) -> list[Path]:
        """The earlier stages' outputs ``stage`` reads."""
        return [self.root / path for path in STAGES[stage].inputs]

    ingest_dir = _stage_dir(
        "ingest", "records.parquet, images.parquet, rejects.jsonl, report.json."
    )
    curate_dir = _stage_dir(
        "curate", "records.parquet, images.parquet (+ group_id), rejects.jsonl, report.json."
    )
    align_dir = _stage_dir("align", "pairs.parquet, orphans.jsonl, report.json.")
    shard_dir = _stage_dir("shard", "{train,val,test}-NNNNNN.tar + manifest.json.")
    model_dir = _stage_dir("train", "last.pt, best.pt, train_report.json.")
    eval_dir = _stage_dir("evaluate", "metrics.json, ablation.json, plots/, report.md, ...")

    @property
    def state_dir(self) -> Path:
        """Local service state: the MLflow store, Prefect's home (never committed)."""
        return self.root / ".mmpipe"

    mlflow_db = _state_path("mlflow.db", "The default MLflow tracking store (SQLite).")
    prefect_home = _state_path("prefect", "PREFECT_HOME: the local Prefect server's DB and logs.")
    feature_cache = _state_path(
        "feature-cache", "The frozen-feature cache: a locked tower's features per shard."
    )
    train_run = _state_path("train_run.json", "The MLflow run that trained models/ (its sha256).")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :]
    return None if path in ("", ":memory:") else Path(path)


def store_uri(uri: str | None, root: str | Path) -> str:
    """``tracking.uri`` made absolute for the project at ``root`` (no env lookup, no mlflow import).

    None means the project's own ``sqlite:///<root>/.mmpipe/mlflow.db``; a relative sqlite path
    is relative to the project, never the cwd. ``mmpipe.tracking`` puts a user's
    ``MLFLOW_TRACKING_URI`` before this; the UI process uses it as is.
    """
    root = Path(root).resolve()
    if not uri:
        return f"sqlite:///{Layout(root).mlflow_db.as_posix()}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{(root / db).as_posix()}"
    return uri
