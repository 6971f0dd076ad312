"""Stage drivers: run one stage of the DAG on a project, as the CLI, the flow and dvc.yaml do.

Each driver reads its params section, calls the stage's pure function on the project's layout
(``mmpipe.layout``) and, under a flow or for the model stages, records the run in MLflow:

    run_stage(name, params, layout)        any stage by name (the CLI, the Prefect tasks)
    stage_ingest / stage_curate / stage_align / stage_shard   data stages; each leaves a fingerprint stamp
    stage_train / stage_evaluate / stage_register
    run_all(params, layout)                every stage in order, in this process

Failure semantics (docs/failure-semantics.md): every driver holds the project lock
(``mmpipe.lock``, re-entrant: the CLI and the flow take it first, with ``--wait-lock``). A data
stage and evaluate write their whole output, stamp included, into a staging directory that is
switched in at once (``mmpipe.commit.staged_dir``): a kill leaves the previous output or the new
one. train does the same with its finished model (``mmpipe.train``). register refuses metrics
that did not score this checkpoint on this data, and promotes by compare-and-set
(``mmpipe.tracking.registry``).

Data stages are cached by the flow on content: ``stage_fingerprint`` hashes the stage's params
section, its code and its inputs (``layout.STAGES``), and ``stage_is_current`` compares it with
the stamp the stage wrote beside its outputs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mmpipe import lock, signals
from mmpipe.commit import staged_dir
from mmpipe.config import IngestParams, Params, RegisterParams, section_hash
from mmpipe.errors import InputError
from mmpipe.faults import fault_point
from mmpipe.io import read_json, sha256_file, write_json_atomic
from mmpipe.layout import STAGES, Layout
from mmpipe.manifest import MANIFEST, manifest_sha256, read_manifest
from mmpipe.storage import (
    is_url,
    listing_digest,
    mirror,
    pinned_version,
    publish_shards,
    redact,
    resolve_shard_bytes,
)

# mmpipe.checkpoint imports torch (~1.6 CPU-s per process): only the functions of the model
# stages import it, so `mmpipe ingest|align|shard` never load torch (tests/unit/test_imports.py)
log = logging.getLogger(__name__)

STAMP = ".stamp.json"
ORDER = tuple(STAGES)  # the DAG's order, as layout.STAGES declares it
_REPO = Path(__file__).resolve().parents[1]  # STAGES' code paths are relative to it


# ----------------------------------------------------------------------------- the cache


def _source_files(params: Params) -> list[Path]:
    """The user's files ingest reads (none for the generated default)."""
    p = params.ingest
    if p.source == "synthetic" or p.root is None or is_url(p.root):
        return []  # an object store's listing is fingerprinted instead (stage_fingerprint)
    root = Path(p.root)
    return sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else []


def _code_files(stage: str) -> list[Path]:
    """The files of the stage's declared code (a directory: its Python files)."""
    files: list[Path] = []
    for name in STAGES[stage].code:
        path = _REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def stage_fingerprint(stage: str, params: Params, layout: Layout) -> str:
    """Hash of what a data stage's output depends on: its params section, its code, its inputs.

    Source images are fingerprinted by (path, size, mtime) rather than read: it has to be cheap
    enough to check on every nightly run. Derived inputs (parquet tables) are hashed in full.
    """
    h = hashlib.sha256(stage.encode())
    for section in STAGES[stage].params:
        h.update(section_hash(getattr(params, section)).encode())
    for path in _code_files(stage):
        h.update(sha256_file(path).encode())
    for path in layout.inputs(stage):
        h.update(sha256_file(path).encode() if path.is_file() else f"missing:{path}".encode())
    for path in _source_files(params) if stage == "ingest" else []:
        st = path.stat()
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    if stage == "ingest" and params.ingest.root and is_url(params.ingest.root):
        h.update(listing_digest(params.ingest.root).encode())  # names, sizes, ETags
    if stage == "curate" and params.curate.scorer:  # a new champion re-scores
        h.update(json.dumps(scorer_identity(params, layout), sort_keys=True).encode())
    return h.hexdigest()[:32]


def stage_is_current(stage: str, params: Params, layout: Layout) -> bool:
    """True when the stage's outputs exist and were made from exactly these inputs and params."""
    stamp = layout.stage_dir(stage) / STAMP
    if not stamp.is_file():
        return False
    return read_json(stamp).get("fingerprint") == stage_fingerprint(stage, params, layout)


# ----------------------------------------------------------------------------- the lock


@contextlib.contextmanager
def project_lock(layout: Layout, what: str, *, wait: float = 0.0) -> Iterator[None]:
    """Hold the project's lock (``<project>/.mmpipe/lock``); ProjectBusy names the holder.

    Re-entrant in one process: the CLI and the flow take it (waiting up to ``wait`` seconds),
    then every driver takes it again for itself, so direct library calls are covered too.
    """
    with lock.project_lock(layout.state_dir, what=what, wait=wait):
        yield


# ----------------------------------------------------------------------------- data stages


def _ingest(params: Params, layout: Layout, out_dir: Path) -> dict[str, Any]:
    from mmpipe.incremental import CHECKS
    from mmpipe.ingest import run_ingest

    # earlier nights' image checks by content: not a versioned output (it only saves decodes)
    return run_ingest(local_source(params.ingest, layout), out_dir, layout.state_dir / CHECKS)


def local_source(p: IngestParams, layout: Layout) -> IngestParams:
    """``p`` itself, or with an object-store ``root`` (``s3://...``) mirrored into
    ``.mmpipe/sources/`` first (``storage.mirror``: only new or changed objects are fetched)."""
    if p.root is None or not is_url(p.root):
        return p
    dest = layout.state_dir / "sources" / hashlib.sha256(p.root.encode()).hexdigest()[:16]
    mirror(p.root, dest)
    return p.model_copy(update={"root": str(dest)})


def _curate(params: Params, layout: Layout, out_dir: Path) -> dict[str, Any]:
    from mmpipe.curate import run_curate
    from mmpipe.ingest import resolve_data_root

    predictor, info = curate_scorer(params, layout)
    root = resolve_data_root(layout.ingest_dir)
    p = params.curate
    return run_curate(layout.ingest_dir, p, out_dir, data_root=root, scorer=predictor,
                      scorer_info=info)  # fmt: skip


def curate_scorer(params: Params, layout: Layout) -> tuple[Any, dict[str, Any] | None]:
    """The ``Predictor`` that ``curate.scorer`` names and what it is (for the report and the
    stage's fingerprint): (None, None) without a scorer; (None, info) for ``champion`` before
    there is one (a warning: nothing is scored). Loaded as ``mmpipe eval-retrieval`` loads a
    model: ``hf:`` as it ships (never downloaded here), else ``tracking.resolve_model``."""
    source = params.curate.scorer
    if not source:
        return None, None
    identity = scorer_identity(params, layout)
    if identity.get("resolved") is None:
        log.warning("curate.scorer champion: %s has no version '%s' yet: nothing is scored",
                    params.register.model_name, params.register.alias)  # fmt: skip
        return None, identity
    from mmpipe import tracking
    from mmpipe.predict import hf_predictor, load_predictor

    if source.startswith("hf:"):
        return hf_predictor(source), identity
    checkpoint, sidecar = tracking.resolve_model(
        identity["resolved"], params.tracking, params.register, layout
    )
    predictor = load_predictor(checkpoint, sidecar=sidecar, shard_dir=layout.shard_dir)
    return predictor, {**identity, "checkpoint_sha256": sha256_file(checkpoint)}


def scorer_identity(params: Params, layout: Layout) -> dict[str, Any]:
    """What ``curate.scorer`` names now, cheaply (no download): ``resolved`` (the URI or path;
    None for a champion that does not exist yet) and a digest where one is known without
    fetching: a checkpoint's sha256, a registered version's number and run, an hf: directory's
    listing. Part of curate's fingerprint, so a new champion re-runs the stage under the flow."""
    source = str(params.curate.scorer)
    info: dict[str, Any] = {"scorer": source, "resolved": source}
    if source.startswith("hf:"):
        path = Path(source[3:])
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
            h = hashlib.sha256()
            for f in files:
                h.update(f"{f.relative_to(path)}:{sha256_file(f)}".encode())
            info["sha256"] = h.hexdigest()
        return info
    from mmpipe import tracking

    if source == "champion":
        if not tracking.has_champion(params.register, params.tracking, layout.root):
            return {**info, "resolved": None}
        info["resolved"] = tracking.champion_uri(params.register)
    if tracking.is_model_uri(info["resolved"]):
        info["version"] = tracking.model_version(info["resolved"], params.tracking, layout.root)
        return info
    path = Path(source)  # a checkpoint, or a models dir: the digest of its checkpoints
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not all(f.is_file() for f in files) or not files:
        raise InputError(f"curate.scorer {source}: no checkpoint there (a .pt file or models dir)")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}".encode())
    info["sha256"] = h.hexdigest()
    return info


def _align(params: Params, layout: Layout, out_dir: Path) -> dict[str, Any]:
    from mmpipe.align import run_align

    return run_align(layout.curate_dir, params.align, out_dir)


def _shard(params: Params, layout: Layout, out_dir: Path) -> dict[str, Any]:
    from mmpipe.shard import run_shard

    # the committed shards (still in place while the stage builds in staging) make it incremental
    previous = layout.shard_dir if (layout.shard_dir / MANIFEST).is_file() else None
    return run_shard(layout.align_dir, layout.ingest_dir, params.shard, out_dir, previous)


_DATA_FUNCTIONS: dict[str, Callable[[Params, Layout, Path], dict[str, Any]]] = {
    "ingest": _ingest,
    "curate": _curate,
    "align": _align,
    "shard": _shard,
}
DATA_STAGES = tuple(_DATA_FUNCTIONS)  # cached by the flow on their fingerprint


def run_data_stage(
    stage: str, params: Params, layout: Layout, *, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Run data stage ``stage`` into a staging directory, stamp it, switch it in; its report.

    Under a flow (``parent_run_id``) the stage is also recorded as a nested MLflow run.
    """
    out_dir, started = layout.stage_dir(stage), time.time()  # the MLflow run's start
    with project_lock(layout, f"mmpipe {stage}"):
        fingerprint = stage_fingerprint(stage, params, layout)
        with staged_dir(out_dir) as staging:
            report = _DATA_FUNCTIONS[stage](params, layout, staging)
            write_json_atomic(staging / STAMP, {"stage": stage, "fingerprint": fingerprint})
            fault_point(f"{stage}:staged")
            # before the local commit: a failed or killed publication leaves the stage not
            # current, so the next run publishes again (uploading only what is missing)
            if stage == "shard" and params.shard.output:
                report = {**report, "published": publish_shards(staging, params.shard.output)}
        if parent_run_id is not None:
            from mmpipe import tracking

            report_file = out_dir / "report.json"
            tracking.log_stage_run(
                params.tracking,
                layout.root,
                stage=stage,
                parent_run_id=parent_run_id,
                section=getattr(params, stage),
                report=report,
                report_file=report_file if report_file.is_file() else out_dir / MANIFEST,
                started=started,
            )
    return report


# validate the configured source into data/ingest/, pair and split it into data/align/, write
# WebDataset shards into data/shards/
stage_ingest = functools.partial(run_data_stage, "ingest")
stage_curate = functools.partial(run_data_stage, "curate")
stage_align = functools.partial(run_data_stage, "align")
stage_shard = functools.partial(run_data_stage, "shard")


# ----------------------------------------------------------------------------- model stages


def manifest_hash(layout: Layout) -> str:
    """sha256 of the shard manifest: the data version every model is trained on."""
    manifest = layout.shard_dir / MANIFEST
    if not manifest.is_file():
        raise InputError(f"{manifest} not found: run `mmpipe shard` first")
    return sha256_file(manifest)


def shard_source(params: Params, layout: Layout) -> tuple[str | Path, str]:
    """Where train/evaluate/register read the shards, and the data version (manifest sha256).

    ``data/shards/`` itself, or with ``shard.output`` set, the published version there that
    ``data/shards/manifest.json`` names (the version DVC tracks, pinned by its sha256, so a
    newer publication by another project cannot change what this run reads). A machine without
    local shards (a training node) reads the version ``LATEST`` names, resolved once here.
    """
    url = params.shard.output
    if not url:
        return layout.shard_dir, manifest_hash(layout)
    if (layout.shard_dir / MANIFEST).is_file():
        version = pinned_version(url, manifest_hash(layout))
    else:
        version = resolve_shard_bytes(url)[0]
    data_hash = manifest_sha256(version)  # checks the manifest against the version's name
    log.info("reading shards from %s", redact(version))
    return version, data_hash


def stage_train(
    params: Params, layout: Layout, *, resume: bool = False, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Train on data/shards/ into models/, tracked as an MLflow run (nested under a flow's run).

    A SIGTERM ends the MLflow run KILLED and raises ``signals.Interrupted`` (checkpoint kept in
    models.partial/); models/ changes only when training completes.
    """
    from mmpipe import tracking
    from mmpipe.train import run_train

    with project_lock(layout, "mmpipe train"):
        shards, data_hash = shard_source(params, layout)
        with tracking.start_run(
            params.tracking, layout.root, run_name="train", parent_run_id=parent_run_id
        ) as run:
            lock.annotate(layout.state_dir, run_id=run.id)
            tracking.log_params(run, params, {"data.manifest_sha256": data_hash})
            report = run_train(
                shards,
                params.train,
                layout.model_dir,
                resume=resume,
                on_epoch_end=tracking.epoch_logger(run),
                fetch_model=functools.partial(fetch_model, params, layout),
                data_sha256=data_hash,
                cache_dir=layout.feature_cache,
            )
            tracking.log_metrics(run, {"train_seconds": report.pop("seconds")})
            if report["stopped_by"] is None:  # installed in models/
                record_train_run(layout, run.id)
    return {**report, "mlflow_run_id": run.id}


def _train_report(layout: Layout) -> dict[str, Any]:
    path = layout.model_dir / "train_report.json"
    return read_json(path) if path.is_file() else {}


def record_train_run(layout: Layout, run_id: str) -> None:
    """Remember which MLflow run trained the checkpoint in models/ (evaluate and register log to it).

    Kept in the project's local state, not in models/: a run id differs on every run, and
    versioned outputs must not (DVC would see a new model each time). The record names the
    checkpoint's sha256, so a models/ swapped since (``dvc checkout``) is never logged to the
    wrong run.
    """
    from mmpipe.checkpoint import pick_checkpoint

    checkpoint = sha256_file(pick_checkpoint(layout.model_dir))
    write_json_atomic(layout.train_run, {"run_id": run_id, "checkpoint_sha256": checkpoint})


def fetch_model(params: Params, layout: Layout, source: str) -> Path | None:
    """The local checkpoint of a registry ``train.init_from`` (``train.resolve_init_from`` calls
    it): a model URI or ``champion`` (the registry's register.model_name@register.alias) is
    fetched from the store. Not found is an error, before training: a warm start that silently
    started cold would hide it. The one exception is ``champion`` on the first night (the
    registry has no champion yet): None, so that run starts from random init, says so in the
    log and in train_report.json (``init_from``), and becomes the first champion."""
    from mmpipe import tracking

    if source == "champion":
        if not tracking.has_champion(params.register, params.tracking, layout.root):
            log.warning(
                "train.init_from champion: %s has no version '%s' yet (first night): "
                "training from random init",
                params.register.model_name,
                params.register.alias,
            )
            return None
        source = tracking.champion_uri(params.register)
    checkpoint, _ = tracking.resolve_model(source, params.tracking, params.register, layout)
    log.info("train.init_from %s: %s", params.train.init_from, checkpoint)
    return checkpoint


def check_register_metric(params: Params, layout: Layout) -> tuple[str, bool]:
    """The register metric this run will be compared on (register.metric or the task's
    default); InputError now, before training, if the shards cannot produce it (e.g.
    accuracy on an unlabelled collection)."""
    from mmpipe.objectives import check_metric_for_data

    manifest = read_manifest(shard_source(params, layout)[0])
    return check_metric_for_data(
        params.register.metric, params.train.task, manifest, params.evaluate.ks
    )


def check_splits(params: Params, layout: Layout) -> None:
    """Right after align: InputError in one line when its splits cannot train and evaluate this
    run (``mmpipe.preflight``), before shard and training spend their time."""
    from mmpipe.align import read_align_report
    from mmpipe.preflight import check_splits as check

    check(read_align_report(layout.align_dir), params)


def register_params(params: Params, layout: Layout) -> RegisterParams:
    """params.register with the metric and its direction resolved for the trained model's task
    and the shards' labels (null = the task's default, or mean_r1 without labels)."""
    from mmpipe.objectives import has_task_labels, resolve_metric

    p = params.register
    report = layout.model_dir / "train_report.json"
    task = read_json(report).get("task") if report.is_file() else None
    labelled = has_task_labels(read_manifest(shard_source(params, layout)[0]))
    metric, greater = resolve_metric(p.metric, p.greater_is_better, task or "multiclass", labelled)
    return p.model_copy(update={"metric": metric, "greater_is_better": greater})


def _checkpoint_sha256(layout: Layout) -> str | None:
    """sha256 of the checkpoint now in models/ (best.pt, else last.pt); None when there is none."""
    from mmpipe.checkpoint import pick_checkpoint

    try:
        return sha256_file(pick_checkpoint(layout.model_dir))
    except InputError:
        return None


def _train_run_id(layout: Layout, current: str | None = None) -> str | None:
    """The MLflow run that trained the checkpoint now in models/ (of sha256 ``current``, hashed
    here when not given), if this project recorded it."""
    if not layout.train_run.is_file():
        return None
    record = read_json(layout.train_run)
    current = current or _checkpoint_sha256(layout)
    if current is None:
        return None
    if record.get("checkpoint_sha256") != current:
        log.info("models/ was not trained by the recorded MLflow run %s", record.get("run_id"))
        return None
    return record.get("run_id")


def stage_evaluate(
    params: Params, layout: Layout, *, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Evaluate models/ on the test shards into reports/ (switched in whole), logged to the
    training run."""
    from mmpipe import tracking
    from mmpipe.evaluate import EXPERIMENT_ENV, run_evaluate
    from mmpipe.publish import stage_report

    experiment = bool(os.environ.get(EXPERIMENT_ENV))  # under `dvc exp run` (evaluate.ablation)
    with project_lock(layout, "mmpipe evaluate"):
        with staged_dir(layout.eval_dir) as staging:
            shards = shard_source(params, layout)[0]
            metrics = run_evaluate(
                shards, layout.model_dir, params.evaluate, staging, experiment=experiment
            )
            stage_report(params, layout, staging)  # the flow rewrites it once registered
            fault_point("evaluate:staged")
        run_id = _train_run_id(layout)
        if run_id is not None:
            tracking.log_evaluation(params.tracking, layout.root, run_id, metrics, layout.eval_dir)
    return metrics


def scored_by(metrics: dict[str, Any], layout: Layout) -> dict[str, str]:
    """What ``metrics`` (metrics.json) scored: the ``scored`` hashes of the evaluation_report.json
    beside it (``checkpoint_sha256``, ``data_sha256``); {} when there is none, or when it is
    another evaluation's (its metrics are not these, e.g. only one of the two was restored)."""
    path = layout.eval_dir / "evaluation_report.json"
    report = read_json(path) if path.is_file() else {}
    same = _canonical(report.get("metrics")) == _canonical(metrics)  # NaN equals NaN here
    return dict(report.get("scored") or {}) if same else {}


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def check_provenance(metrics: dict[str, Any], layout: Layout, have: str | None = None) -> str:
    """The data hash register may use: metrics.json scored THIS checkpoint (of sha256 ``have``,
    hashed here when not given) on THIS data, which is the data the model was trained on; else
    an InputError saying what to re-run."""
    from mmpipe.checkpoint import pick_checkpoint

    path = layout.eval_dir / "metrics.json"
    checkpoint = pick_checkpoint(layout.model_dir)
    provenance = scored_by(metrics, layout)
    scored, have = provenance.get("checkpoint_sha256"), have or sha256_file(checkpoint)
    if scored != have:
        why = (
            "records no checkpoint (no evaluation_report.json of the same evaluation beside it)"
            if scored is None
            else f"scored {scored[:12]}..."
        )
        raise InputError(
            f"{path} {why}, not {checkpoint} (sha256 {have[:12]}...): models/ changed since "
            "`mmpipe evaluate`; run `mmpipe evaluate` before `mmpipe register`"
        )
    data_hash = manifest_hash(layout)
    if provenance.get("data_sha256") != data_hash:
        raise InputError(
            f"{path} was scored on another data version than {layout.shard_dir} now holds "
            "(its manifest changed since `mmpipe evaluate`); run `mmpipe evaluate` again"
        )
    trained_on = _train_report(layout).get("data_hash")
    if trained_on != data_hash:
        raise InputError(
            f"{checkpoint} was trained on another data version than {layout.shard_dir} now "
            "holds; run `mmpipe train` and `mmpipe evaluate` again before registering"
        )
    return data_hash


def stage_register(
    params: Params, layout: Layout, *, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Log the trained model, register a new version and move the champion alias if it is
    better on this test split (the champion is re-scored on it when it was scored on another).

    The logged model carries what it was trained on and its training data's embedding profile
    (for predict's out-of-distribution warning); the version's description is its model card.
    """
    from mmpipe import tracking
    from mmpipe.checkpoint import read_checkpoint
    from mmpipe.modelcard import training_data
    from mmpipe.objectives import task_label
    from mmpipe.ood import create_profile
    from mmpipe.predict import load_predictor
    from mmpipe.publish import describe_registered
    from mmpipe.serving import example_frame

    with project_lock(layout, "mmpipe register"):
        current = _checkpoint_sha256(layout)  # hashed once: both checks below compare with it
        run_id = _train_run_id(layout, current)
        if run_id is None:
            raise InputError(
                f"no MLflow run recorded for the model in {layout.model_dir}: run `mmpipe train` "
                "first"
            )
        metrics_path = layout.eval_dir / "metrics.json"
        if not metrics_path.is_file():
            raise InputError(f"{metrics_path} not found: run `mmpipe evaluate` first")
        metrics = read_json(metrics_path)
        data_hash = check_provenance(metrics, layout, current)
        predictor = load_predictor(layout.model_dir, shard_dir=layout.shard_dir)
        predictor.training = training_data(layout)
        shards = shard_source(params, layout)[0]
        profile = create_profile(predictor.model, shards)
        run = tracking.connect(params.tracking, layout.root).run(run_id)
        example = example_frame(shards)  # the served model's input example: a training sample
        model_uri = tracking.log_model(run, predictor, example=example, profile=profile)
        registered = tracking.register_and_maybe_promote(
            run,
            model_uri,
            metrics,
            register_params(params, layout),
            data_hash=data_hash,
            rescore=functools.partial(score_on_test_split, params, layout),
        )
        model_params = read_checkpoint(predictor.source)["params"]  # what it was trained with
        task = task_label(predictor.task, metrics)  # "retrieval": no labels to train or score
        describe_registered(
            params, layout, registered, metrics, predictor.training, task, model_params
        )
        return registered


def score_on_test_split(params: Params, layout: Layout, checkpoint: Path) -> dict[str, float]:
    """Evaluate's test metrics (no ablation) of any checkpoint on this project's test split."""
    from mmpipe.evaluate import score_checkpoint

    return score_checkpoint(checkpoint, shard_source(params, layout)[0], params.evaluate)


# ----------------------------------------------------------------------------- by name


def run_stage(
    stage: str,
    params: Params,
    layout: Layout,
    *,
    parent_run_id: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one stage by name; ``resume`` applies to train only."""
    if stage in DATA_STAGES:
        return run_data_stage(stage, params, layout, parent_run_id=parent_run_id)
    if stage == "train":
        return stage_train(params, layout, resume=resume, parent_run_id=parent_run_id)
    drivers = {"evaluate": stage_evaluate, "register": stage_register}
    if stage not in drivers:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(ORDER)}")
    return drivers[stage](params, layout, parent_run_id=parent_run_id)


def run_all(
    params: Params, layout: Layout, *, resume: bool = False, until: str | None = None
) -> dict[str, Any]:
    """Every stage in order in this process (no orchestration), under one hold of the lock;
    ``until``: stop after that stage (``shard``: the data stages only, one process's imports).

    align's splits are checked right after align (``check_splits``), the register metric
    against the shards before training starts. A signal between
    two stages stops the run before the next one (``signals.Interrupted``).
    """
    if until is not None and until not in ORDER:
        raise ValueError(f"unknown stage {until!r}; expected one of {', '.join(ORDER)}")
    results: dict[str, Any] = {}
    with project_lock(layout, "mmpipe run"):
        for name in ORDER:
            signals.raise_if_requested(f"before {name}")
            if name == "train":
                check_register_metric(params, layout)
            results[name] = run_stage(name, params, layout, resume=resume)
            if name == "align":
                check_splits(params, layout)
            if name == until:
                break
    return results


# ----------------------------------------------------------------------------- a flow's run


def open_flow_run(params: Params, layout: Layout) -> str:
    """Start the MLflow parent run of one orchestrated run of the DAG; returns its id."""
    from mmpipe import tracking

    return tracking.open_parent_run(params.tracking, layout.root, params)


def close_flow_run(params: Params, layout: Layout, run_id: str, status: str, summary: str) -> None:
    """End the parent run with `status` (FINISHED/FAILED) and the flow's summary table."""
    from mmpipe import tracking

    tracking.close_parent_run(params.tracking, layout.root, run_id, status, summary)
