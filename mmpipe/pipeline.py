"""Stage drivers: one function per stage, called by the CLI (`python -m mmpipe <stage>`, what
dvc.yaml runs) and by the Prefect tasks in `tasks/`. Each reads its params section, calls the pure
stage function on the project's layout and, for train/evaluate/register, records the run in MLflow.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from mmpipe.config import Params, section_hash
from mmpipe.errors import InputError
from mmpipe.io import read_json, sha256_file, write_json_atomic
from mmpipe.layout import Layout

log = logging.getLogger(__name__)


STAMP = ".stamp.json"

# The code each data stage runs: a change to it invalidates the stage like a change of params.
_STAGE_CODE = {
    "ingest": ("ingest.py", "synthetic.py"),
    "align": ("align.py",),
    "shard": ("shard.py", "augment.py"),
}


def _stage_out_dir(stage: str, layout: Layout) -> Path:
    return {"ingest": layout.ingest_dir, "align": layout.align_dir, "shard": layout.shard_dir}[stage]


def _source_files(params: Params) -> list[Path]:
    """The user's files ingest reads (none for the generated default)."""
    p = params.ingest
    if p.source == "synthetic" or p.root is None:
        return []
    root = Path(p.root)
    return sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []


def _stage_inputs(stage: str, params: Params, layout: Layout) -> list[Path]:
    if stage == "ingest":
        return _source_files(params)
    if stage == "align":
        return [layout.ingest_dir / "records.parquet", layout.ingest_dir / "images.parquet"]
    return [layout.align_dir / "pairs.parquet"]


def stage_fingerprint(stage: str, params: Params, layout: Layout) -> str:
    """Hash of what a data stage's output depends on: its params section, its code, its inputs.

    Source images are fingerprinted by (path, size, mtime) rather than read: it has to be cheap
    enough to check on every nightly run. Derived inputs (parquet tables) are hashed in full.
    """
    h = hashlib.sha256(stage.encode())
    h.update(section_hash(getattr(params, stage)).encode())
    pkg = Path(__file__).parent
    for name in _STAGE_CODE[stage]:
        h.update(sha256_file(pkg / name).encode())
    for path in _stage_inputs(stage, params, layout):
        if not path.is_file():
            h.update(f"missing:{path}".encode())
        elif stage == "ingest":
            st = path.stat()
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(sha256_file(path).encode())
    return h.hexdigest()[:32]


def stage_is_current(stage: str, params: Params, layout: Layout) -> bool:
    """True when the stage's outputs exist and were made from exactly these inputs and params."""
    stamp = _stage_out_dir(stage, layout) / STAMP
    if not stamp.is_file():
        return False
    return read_json(stamp).get("fingerprint") == stage_fingerprint(stage, params, layout)


def _run_data_stage(
    stage: str, params: Params, layout: Layout, fn: Any, parent_run_id: str | None
) -> dict[str, Any]:
    out_dir = _stage_out_dir(stage, layout)
    stamp = out_dir / STAMP
    if stamp.exists():  # outputs are about to change: the old stamp no longer vouches for them
        stamp.unlink()
    fingerprint = stage_fingerprint(stage, params, layout)
    report = fn()
    write_json_atomic(stamp, {"stage": stage, "fingerprint": fingerprint})
    if parent_run_id is not None:  # under a flow: one nested MLflow run per stage
        from mmpipe import tracking

        report_file = out_dir / "report.json"
        tracking.log_stage_run(
            params.tracking,
            layout.root,
            stage=stage,
            parent_run_id=parent_run_id,
            section=getattr(params, stage).model_dump(mode="json"),
            report=report,
            report_file=report_file if report_file.is_file() else out_dir / "manifest.json",
        )
    return report


def stage_ingest(
    params: Params, layout: Layout, *, parent_run_id: str | None = None, **_: Any
) -> dict[str, Any]:
    """Validate the configured source into data/ingest/ (a nested MLflow run under a flow's)."""
    from mmpipe.ingest import run_ingest

    return _run_data_stage(
        "ingest",
        params,
        layout,
        lambda: run_ingest(params.ingest, layout.ingest_dir),
        parent_run_id,
    )


def stage_align(
    params: Params, layout: Layout, *, parent_run_id: str | None = None, **_: Any
) -> dict[str, Any]:
    """Pair and split data/ingest/ into data/align/ (a nested MLflow run under a flow's)."""
    from mmpipe.align import run_align

    return _run_data_stage(
        "align",
        params,
        layout,
        lambda: run_align(layout.ingest_dir, params.align, layout.align_dir),
        parent_run_id,
    )


def stage_shard(
    params: Params, layout: Layout, *, parent_run_id: str | None = None, **_: Any
) -> dict[str, Any]:
    """Write WebDataset shards of data/align/ into data/shards/ (nested run under a flow's)."""
    from mmpipe.shard import run_shard

    return _run_data_stage(
        "shard",
        params,
        layout,
        lambda: run_shard(layout.align_dir, layout.ingest_dir, params.shard, layout.shard_dir),
        parent_run_id,
    )


def manifest_hash(layout: Layout) -> str:
    """sha256 of the shard manifest: the data version every model is trained on."""
    manifest = layout.shard_dir / "manifest.json"
    if not manifest.is_file():
        raise InputError(f"{manifest} not found: run `mmpipe shard` first")
    return sha256_file(manifest)


def stage_train(
    params: Params, layout: Layout, *, resume: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train on data/shards/ into models/, tracked as an MLflow run (nested under a flow's run)."""
    from mmpipe import tracking
    from mmpipe.train import run_train

    data_hash = manifest_hash(layout)
    with tracking.start_run(
        params.tracking, layout.root, run_name="train", parent_run_id=parent_run_id
    ) as run_id:
        tracking.log_params_flat(params, {"data.manifest_sha256": data_hash})
        report = run_train(
            layout.shard_dir,
            params.train,
            layout.model_dir,
            resume=resume,
            on_epoch_end=tracking.epoch_logger(run_id),
        )
        report["mlflow_run_id"] = run_id
        report["data_hash"] = data_hash
        write_json_atomic(layout.model_dir / "train_report.json", report)
    return report


def _train_run_id(layout: Layout) -> str | None:
    path = layout.model_dir / "train_report.json"
    return read_json(path).get("mlflow_run_id") if path.is_file() else None


def stage_evaluate(
    params: Params, layout: Layout, *, parent_run_id: str | None = None, **_: Any
) -> dict[str, Any]:
    """Evaluate models/ on the test shards into reports/, logged to the training run."""
    from mmpipe import tracking
    from mmpipe.evaluate import run_evaluate

    metrics = run_evaluate(
        layout.shard_dir, layout.model_dir, params.evaluate, layout.eval_dir, train_params=params.train
    )
    run_id = _train_run_id(layout)
    if run_id is not None:
        tracking.log_evaluation(params.tracking, layout.root, run_id, metrics, layout.eval_dir)
    return metrics


def stage_register(
    params: Params, layout: Layout, *, parent_run_id: str | None = None, **_: Any
) -> dict[str, Any]:
    """Log the trained model, register a new version and move the champion alias if it is better."""
    from mmpipe import tracking

    run_id = _train_run_id(layout)
    if run_id is None:
        raise InputError(f"{layout.model_dir / 'train_report.json'} not found: run `mmpipe train` first")
    metrics_path = layout.eval_dir / "metrics.json"
    if not metrics_path.is_file():
        raise InputError(f"{metrics_path} not found: run `mmpipe evaluate` first")
    return tracking.register_trained_model(
        params.tracking,
        layout.root,
        run_id=run_id,
        model_dir=layout.model_dir,
        metrics=read_json(metrics_path),
        register=params.register,
        data_hash=manifest_hash(layout),
    )


def run_all(params: Params, layout: Layout, *, resume: bool = False) -> dict[str, Any]:
    """Every stage in order in this process (no orchestration): handy for debugging."""
    out: dict[str, Any] = {}
    for name, fn in (
        ("ingest", stage_ingest),
        ("align", stage_align),
        ("shard", stage_shard),
    ):
        out[name] = fn(params, layout)
    out["train"] = stage_train(params, layout, resume=resume)
    out["evaluate"] = stage_evaluate(params, layout)
    out["register"] = stage_register(params, layout)
    return out


def project_root(path: str | Path = ".") -> Path:
    """Absolute project directory."""
    return Path(path).resolve()


def open_flow_run(params: Params, layout: Layout) -> str:
    """Start the MLflow parent run of one orchestrated run of the DAG; returns its id."""
    from mmpipe import tracking

    return tracking.open_parent_run(params.tracking, layout.root, params)


def close_flow_run(params: Params, layout: Layout, run_id: str, status: str, summary: str) -> None:
    """End the parent run with `status` (FINISHED/FAILED) and the flow's summary table."""
    from mmpipe import tracking

    tracking.close_parent_run(params.tracking, layout.root, run_id, status, summary)
