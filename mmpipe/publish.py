"""What a finished run leaves for people: the report, its run record, the model card, the night's
row in MLflow.

    reports/run.json     the run's context: date, commit, params, timings, the registered version
                         and the champion it was compared with (not a DVC output: it differs on
                         every run; `mmpipe restore` rewrites it and the report from the
                         restored outputs, and each night's own is on its MLflow parent run)
    reports/report.html  the page a person opens the morning after (mmpipe.report), built from
                         run.json and evaluate's outputs; report.md is the same in Markdown

``stage_report`` writes them after ``mmpipe evaluate`` (no registration yet); ``publish_flow_run``
rewrites them after the nightly flow's register stage, logs the night's headline metrics on the
flow's parent run and attaches the report to it. ``describe_registered`` writes a registered
version's model card.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmpipe.config import Params, flatten
from mmpipe.io import write_json_atomic
from mmpipe.layout import Layout
from mmpipe.modelcard import render_card, training_data

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"
_CODE = Path(__file__).resolve().parent  # git is asked about the code that ran
# what makes a run's outputs differ; a dirty tree here means the commit alone does not say
_TRACKED = ("mmpipe", "flows", "tasks", "params.yaml", "dvc.yaml", "pyproject.toml")
# what "changed since the champion" compares (params flattened as MLflow logs them)
_COMPARED_SECTIONS = ("ingest.", "align.", "shard.", "train.", "evaluate.")


def git_state() -> dict[str, Any]:
    """The code's commit and whether its pipeline files had uncommitted changes."""
    from mmpipe.tracking import git_commit

    commit = git_commit(_CODE)
    dirty = None
    if commit != "unknown":
        proc = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *_TRACKED],
            cwd=_git_root(), capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        dirty = bool(proc.stdout.strip()) if proc.returncode == 0 else None
    return {"commit": commit, "dirty": dirty}


def machine() -> dict[str, Any]:
    """Where the run ran: what decides whether another run can reproduce its bytes."""
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }


def _git_root() -> Path:
    proc = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=_CODE, capture_output=True, text=True
    )
    return Path(proc.stdout.strip()) if proc.returncode == 0 else _CODE


def run_context(
    params: Params,
    layout: Layout,
    *,
    origin: str,
    params_file: str = "params.yaml",
    overrides: Sequence[str] = (),
    timings: Mapping[str, float] | None = None,
    registered: Mapping[str, Any] | None = None,
    champion: Mapping[str, Any] | None = None,
    mlflow: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run record: everything the report says that evaluate's outputs do not."""
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return {
        "origin": origin,
        "date": now.isoformat().replace("+00:00", "Z"),
        **git_state(),
        "params_file": params_file,
        "overrides": list(overrides),
        "params": params.model_dump(mode="json"),
        "training_data": training_data(layout),
        "timings": dict(timings or {}),
        "machine": machine(),
        "registered": dict(registered) if registered else None,
        "champion": dict(champion) if champion else None,
        "changes": changes_since(params, layout, champion),
        "mlflow": dict(mlflow or {}),
    }


def changes_since(
    params: Params, layout: Layout, champion: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Params, data and code of this run against the champion's training run (None: no champion).

    ``params``: {key: [champion's, this run's]} for every differing data/train/evaluate key.
    """
    if not champion:
        return None
    old = champion.get("params") or {}
    new = {k: "null" if v is None else str(v) for k, v in flatten(params).items()}
    diff = {
        k: [old.get(k), new.get(k)]
        for k in sorted(set(old) | set(new))
        if k.startswith(_COMPARED_SECTIONS) and old.get(k) != new.get(k)
    }
    data_hash = training_data(layout).get("data_hash")
    old_hash = old.get("data.manifest_sha256")
    return {
        "params": diff,
        "data": None if old_hash is None else old_hash != data_hash,
        "commit": [old.get("git.commit"), git_state()["commit"]],
    }


def write_run_report(
    layout: Layout, context: Mapping[str, Any], out_dir: Path | None = None
) -> dict[str, str]:
    """run.json + report.md + report.html from ``context`` and evaluate's outputs, in
    ``out_dir`` (default reports/; evaluate passes its staging directory)."""
    from mmpipe.report import write_report

    out_dir = layout.eval_dir if out_dir is None else out_dir
    write_json_atomic(out_dir / RUN_RECORD, dict(context))
    return write_report(out_dir, context)


def stage_report(
    params: Params, layout: Layout, out_dir: Path | None = None, origin: str = "mmpipe evaluate"
) -> dict[str, str]:
    """The report after `mmpipe evaluate` on its own (e.g. `dvc repro`) or after `mmpipe
    restore`: evaluate's outputs as they are, nothing registered."""
    context = run_context(params, layout, origin=origin)
    return write_run_report(layout, context, out_dir)


# ----------------------------------------------------------------------------- registration


def describe_registered(
    params: Params,
    layout: Layout,
    registered: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    task: str,
    model_params: Mapping[str, Any],
) -> str:
    """Write the registered version's model card (its MLflow description); returns the card."""
    from mmpipe import tracking

    champion = tracking.version_info(
        params.tracking, layout.root, params.register.model_name,
        registered.get("previous_champion_version"),
    )  # fmt: skip
    card = render_card(
        registered=registered, metrics=metrics, data=data, task=task, champion=champion,
        commit=git_state()["commit"], params_note=params_note(layout, model_params),
    )  # fmt: skip
    tracking.describe_version(
        params.tracking, layout.root, params.register.model_name, registered["version"], card
    )
    return card


def params_note(layout: Layout, model_params: Mapping[str, Any]) -> str:
    """The model's train params against the project's params.yaml: the same, or what differs."""
    from mmpipe.config import ParamsError, load_params

    path = layout.root / "params.yaml"
    try:
        declared = load_params(path).train.model_dump(mode="json")
    except ParamsError:
        return "train params as stored in the checkpoint (no params.yaml in the project)"
    diff = [
        f"{k}={model_params.get(k)!r} (file: {v!r})"
        for k, v in declared.items()
        if model_params.get(k) != v
    ]
    if not diff:
        return "`params.yaml` (the model's train section is the file's)"
    return "`params.yaml` overridden for this model: train." + ", train.".join(diff)


# ----------------------------------------------------------------------------- a flow's run


def best_validation(train_report: Mapping[str, Any]) -> dict[str, float]:
    """``{"best_val_accuracy": x}`` (or ``best_val_loss``) from train's report, if it has one."""
    name, value = train_report.get("selection_metric"), train_report.get("best_metric")
    if not isinstance(name, str) or not isinstance(value, int | float):
        return {}
    sign = -1.0 if name.startswith("-") else 1.0  # "-val_loss": higher is better, stored negated
    return {f"best_{name.lstrip('-')}": sign * float(value)}


def publish_flow_run(
    params: Params,
    layout: Layout,
    parent_run_id: str,
    results: Mapping[str, Mapping[str, Any]],
    *,
    timings: Mapping[str, float],
    params_file: str,
    overrides: Sequence[str] = (),
) -> dict[str, str]:
    """After the flow's register stage: the night's metrics on the parent run, the report."""
    from mmpipe import tracking

    metrics, registered = results.get("evaluate") or {}, results.get("register")
    train = results.get("train") or {}
    extra = best_validation(train)
    promoted = None if registered is None else bool(registered.get("promoted"))
    tracking.log_flow_results(
        params.tracking, layout.root, parent_run_id, metrics, promoted=promoted, extra=extra
    )
    champion = None
    if registered is not None:
        champion = tracking.version_info(
            params.tracking, layout.root, params.register.model_name,
            registered.get("previous_champion_version"),
        )  # fmt: skip
    context = run_context(
        params, layout, origin="nightly flow", params_file=params_file, overrides=overrides,
        timings=timings, registered=registered, champion=champion,
        mlflow={"parent_run_id": parent_run_id, "train_run_id": train.get("mlflow_run_id")},
    )  # fmt: skip
    paths = write_run_report(layout, context)
    run = tracking.connect(params.tracking, layout.root).run(parent_run_id)
    for path in (*paths.values(), str(layout.eval_dir / RUN_RECORD)):
        tracking.log_artifacts(run, path)
    return paths
