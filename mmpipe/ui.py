"""Start the MLflow UI on a project's tracking store and point the user at each night's result.

    mmpipe ui [--params params.yaml] [--set section.key=value ...] [--project-dir .] [--port 5000]

Which store: the project's params, as every other command reads them: ``MLFLOW_TRACKING_URI`` (env)
> ``tracking.uri`` > ``sqlite:///<project>/.mmpipe/mlflow.db``; experiment ``tracking.experiment``,
registered model ``register.model_name``. A SQLite or other database URI (PostgreSQL, MySQL) is
served by ``python -m mlflow server`` in a subprocess (this module never imports mlflow: the CLI
stays fast and ~150 MB lighter while it waits), bound to 127.0.0.1, its log in
``<project>/.mmpipe/ui.log``. An ``http(s)://`` URI is a tracking server that serves its own UI:
nothing is started, the URL points there.

The server runs without MLflow 3.17's job runner and its huey workers
(``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``: GenAI jobs mmpipe does not use) and without
telemetry (``MLFLOW_DISABLE_TELEMETRY=true``), in its own process group, stopped as a whole on
Ctrl-C, SIGTERM or SIGHUP (see mmpipe/services.py).

The page the printed URL opens (MLflow 3.17 specifics):
* "Model training" mode, not the GenAI traces overview: ``?workflowType=machine_learning`` in the
  hash route (the mode is a UI-wide localStorage setting that this parameter overrides).
* A *shared view*: the experiment tag ``mlflow.sharedViewState.mmpipe-training`` holds a view
  state (columns, search filter, order) and ``&viewStateShareKey=mmpipe-training`` applies it. The
  3.17 table shows no metric columns by default, and which columns/filter to show only lives in
  the browser otherwise. ``start_ui`` rewrites that tag on each start from the recent runs (only
  a tag it wrote itself, marked ``"mmpipeAuto": true``; a view someone saved is left alone).
* Columns: ``HEADLINE_COLUMNS`` in that order, the ones some recent run has.
* Rows: one per night with its result. The view cannot expand nested runs (3.17 keeps
  ``runsExpanded`` out of shared views) and a flow's parent run collapses its children, so the
  view filters on the runs that carry the results: the flow's parent runs once they log the
  headline metrics, else the ``train`` runs (where the nightly flow logs ``test.*``).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from mmpipe import services
from mmpipe.config import Params
from mmpipe.errors import InputError
from mmpipe.layout import Layout, sqlite_path
from mmpipe.layout import store_uri as layout_store_uri
from mmpipe.objectives import resolve_metric

log = logging.getLogger(__name__)

# The UI's "Model training" mode (see the module docstring): a query parameter of the hash route.
ML_MODE = "workflowType=machine_learning"
VIEW_KEY = "mmpipe-training"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
RECENT_RUNS = 50

# The runs table's columns, in this order: "metrics.<key>", "tags.<key>" or "attributes.<name>".
# One list for the flow's parent run and the train run, which log the same `test.*` names. A
# column shows only when a recent run has it, so an unlabelled collection (no accuracy) or a
# regression task (test.rmse) gets no empty columns. The task's own metric (`register.metric`)
# comes first in any case. `promoted` (1/0 or true/false): whether that night moved the alias.
HEADLINE_COLUMNS: tuple[str, ...] = (
    "attributes.Models",  # the registered version each night produced
    "metrics.test.accuracy",
    "metrics.test.macro_f1",
    "metrics.test.rmse",
    "metrics.test.mae",
    "metrics.test.i2t_r1",
    "metrics.test.t2i_r1",
    "metrics.test.fusion_gain",
    "metrics.best_val_accuracy",
    "metrics.val_accuracy",
    "metrics.val_rmse",
    "metrics.promoted",
    "tags.promoted",
    "metrics.test.n_test_pairs",
    "metrics.test.n_labelled",
    "metrics.epoch",
)
# Which runs are a night's result (see the module docstring).
FLOW_FILTER = "tags.`mmpipe.kind` = 'flow'"
TRAIN_FILTER = "attributes.run_name = 'train'"


@dataclass(frozen=True)
class UiTarget:
    """What the UI shows: a tracking store, the experiment and registered model in it."""

    tracking_uri: str
    experiment: str = "mmpipe"
    model_name: str = "mmpipe-fusion"
    task_metric: str = "accuracy"
    state_dir: Path = Path(".mmpipe")  # the project's .mmpipe/ (ui.log, default artifacts)


def create_ui_target(params: Params, project_dir: str | Path) -> UiTarget:
    """The UI target of a project's params (tracking.*, register.*)."""
    return UiTarget(
        tracking_uri=store_uri(params.tracking.uri, project_dir),
        experiment=params.tracking.experiment,
        model_name=params.register.model_name,
        # null = the task's default (the UI cannot see whether the data is labelled)
        task_metric=resolve_metric(params.register.metric, None, params.train.task, True)[0],
        state_dir=Layout(Path(project_dir).resolve()).state_dir,
    )


def store_uri(uri: str | None, project_dir: str | Path) -> str:
    """The tracking URI the pipeline logs to: env MLFLOW_TRACKING_URI, else ``uri``, else default.

    ``layout.store_uri`` is the rule ``mmpipe.tracking`` applies too (a test checks they agree);
    loading ``mmpipe.tracking`` loads mlflow too: ~2 s and ~150 MB in a process that lives
    as long as the UI.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or layout_store_uri(uri, project_dir)


def is_remote(uri: str) -> bool:
    """An MLflow tracking server (it serves its own UI), not a store to serve."""
    return uri.startswith(("http://", "https://"))


def artifacts_dir(target: UiTarget) -> Path:
    """Where the server puts artifacts it proxies: beside a SQLite DB, else in .mmpipe/."""
    db = sqlite_path(target.tracking_uri)
    return (db.parent if db is not None else target.state_dir) / "mlartifacts"


def ui_command(target: UiTarget, host: str = services.LOOPBACK, port: int = 5000) -> list[str]:
    """The argv of the MLflow server (the store URI goes in the environment: see ``ui_env``)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        # experiments created through the UI/REST API put artifacts beside the DB too
        "--artifacts-destination", artifacts_dir(target).as_posix(),
        "--host", host,
        "--port", str(port),
        "--workers", "1",  # a local single-user UI; more workers only slow the start
    ]  # fmt: skip


def ui_env(target: UiTarget) -> dict[str, str]:
    """The server's environment: the store (not in argv, where `ps` would show a DB password),
    no job runner, no telemetry."""
    return {
        **os.environ,
        "MLFLOW_BACKEND_STORE_URI": target.tracking_uri,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def runs_url(base_url: str, experiment_id: str | None, view: bool = False) -> str:
    """The "Model training" runs table of an experiment (or the experiment list if none yet)."""
    if experiment_id is None:
        return f"{base_url}/#/experiments?{ML_MODE}"
    share = f"&viewStateShareKey={VIEW_KEY}" if view else ""
    return f"{base_url}/#/experiments/{experiment_id}/runs?{ML_MODE}{share}"


def model_url(base_url: str, name: str) -> str:
    """The registered model's page (its versions and aliases)."""
    return f"{base_url}/#/models/{urllib.parse.quote(name)}?{ML_MODE}"


@dataclass
class UiServer:
    """A UI at ``base_url``: a server subprocess started here, or a remote tracking server."""

    process: subprocess.Popen[bytes] | None  # None: a remote tracking server
    base_url: str
    target: UiTarget
    experiment_id: str | None
    log_file: Path | None
    has_view: bool = False
    runs_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.runs_url = runs_url(self.base_url, self.experiment_id, self.has_view)

    @property
    def model_url(self) -> str:
        """The registered model's page."""
        return model_url(self.base_url, self.target.model_name)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server's whole process group (nothing to do for a remote server)."""
        if self.process is not None:
            services.stop_group(self.process, timeout)


# --------------------------------------------------------------------------- REST helpers


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's store
        return json.loads(resp.read().decode())


def _post_json(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the user's store
        return json.loads(resp.read().decode() or "{}")


def get_experiment(base_url: str, name: str) -> dict | None:
    """Experiment ``name`` as the REST API returns it, or None if it does not exist yet."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        body = _get_json(f"{base_url}/api/2.0/mlflow/experiments/get-by-name?{query}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # RESOURCE_DOES_NOT_EXIST
            return None
        raise
    return body["experiment"]


def recent_runs(base_url: str, exp_id: str, n: int = RECENT_RUNS) -> list[dict]:
    """The experiment's ``n`` latest runs as the REST API returns them."""
    body = _post_json(
        f"{base_url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp_id], "max_results": n, "order_by": ["attributes.start_time DESC"]},
    )
    return body.get("runs", [])


# --------------------------------------------------------------------------- the landing view


def _run_keys(run: dict) -> set[str]:
    data = run.get("data", {})
    return {f"metrics.{m['key']}" for m in data.get("metrics", [])} | {
        f"tags.{t['key']}" for t in data.get("tags", [])
    }


def _is_flow_run(run: dict) -> bool:
    tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
    return tags.get("mmpipe.kind") == "flow"


def headline_columns(runs: Iterable[dict], task_metric: str = "accuracy") -> list[str]:
    """The declared columns that some of ``runs`` has, in order (the task's metric first of the
    metrics), as MLflow column ids (``metrics.`test.accuracy```)."""
    present = set().union(set(), *(_run_keys(r) for r in runs))
    attrs = [c for c in HEADLINE_COLUMNS if c.startswith("attributes.")]
    rest = [c for c in HEADLINE_COLUMNS if not c.startswith("attributes.")]
    wanted = dict.fromkeys([*attrs, f"metrics.test.{task_metric}", *rest])
    columns = [c for c in wanted if c.startswith("attributes.") or c in present]
    return [f"{kind}.`{key}`" for kind, key in (c.split(".", 1) for c in columns)]


def landing_filter(runs: Iterable[dict]) -> str:
    """The search filter whose rows are each night's result (see the module docstring)."""
    metric_cols = {c for c in HEADLINE_COLUMNS if c.startswith("metrics.test.")}
    runs = list(runs)
    if any(_is_flow_run(r) and _run_keys(r) & metric_cols for r in runs):
        return FLOW_FILTER
    if any(_run_keys(r) & metric_cols for r in runs):
        return TRAIN_FILTER
    return ""


def landing_view(runs: Iterable[dict], task_metric: str = "accuracy") -> dict[str, Any]:
    """The shared view state: headline columns in order, one row per night, newest first."""
    runs = list(runs)
    columns = headline_columns(runs, task_metric)
    search = landing_filter(runs)
    return {
        "selectedColumns": columns,
        "columnOrder": columns,  # else the table sorts the selected columns alphabetically
        "searchFilter": search,
        # 3.17 nests child runs under their parent (collapsed, and the parents of matching
        # children are fetched too) only when sorted by start time: the train runs, children
        # of the flow's runs, show as rows of their own when sorted by end time instead
        "orderByKey": "attributes.end_time" if search == TRAIN_FILTER else "attributes.start_time",
        "orderByAsc": False,
        "mmpipeAuto": True,  # ours: safe to rewrite when the runs change
    }


def ensure_landing_view(base_url: str, exp: dict, task_metric: str = "accuracy") -> bool:
    """Keep the shared landing view up to date with the recent runs; True if the view exists."""
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    if VIEW_TAG in tags and not _is_ours(tags[VIEW_TAG]):
        return True  # someone chose this view on purpose: leave it
    runs = recent_runs(base_url, str(exp["experiment_id"]))
    if not runs:
        return VIEW_TAG in tags
    value = json.dumps(landing_view(runs, task_metric))
    if tags.get(VIEW_TAG) != value:
        _post_json(
            f"{base_url}/api/2.0/mlflow/experiments/set-experiment-tag",
            {"experiment_id": str(exp["experiment_id"]), "key": VIEW_TAG, "value": value},
        )
    return True


def _is_ours(value: str) -> bool:
    try:
        return bool(json.loads(value).get("mmpipeAuto"))
    except (ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- start / serve


def start_ui(
    target: UiTarget, host: str = services.LOOPBACK, port: int = 5000, timeout: float = 90.0
) -> UiServer:
    """Start the UI server on the target's store (or use a remote one); return once it answers."""
    if target.tracking_uri.startswith("databricks"):
        raise InputError(f"tracking URI {target.tracking_uri!r}: open the Databricks workspace UI")
    if is_remote(target.tracking_uri):
        base_url = target.tracking_uri.rstrip("/")
        if not services.http_ok(f"{base_url}/health", timeout=10):
            raise InputError(f"the MLflow tracking server {base_url} does not answer /health")
        return _finish_start(None, base_url, target, None)
    db = sqlite_path(target.tracking_uri)
    if db is not None and not db.is_file():
        raise InputError(
            f"no MLflow store at {db}: run the pipeline first (`make run`, `mmpipe run` or "
            f"`python -m flows.nightly`)"
        )
    if services.port_in_use(host, port):
        raise InputError(
            f"port {port} on {host} is already in use: pass another (`mmpipe ui --port "
            f"{port + 1}`, `make ui PORT={port + 1}`)"
        )
    artifacts_dir(target).mkdir(parents=True, exist_ok=True)
    log_file = target.state_dir / "ui.log"
    base_url = f"http://{host}:{port}"
    proc = services.start_server(
        ui_command(target, host, port),
        name="the MLflow UI",
        health_url=f"{base_url}/health",
        log_file=log_file,
        env=ui_env(target),
        cwd=target.state_dir,  # anything MLflow writes relative to the cwd stays in .mmpipe/
        timeout=timeout,
    )
    try:
        return _finish_start(proc, base_url, target, log_file)
    except BaseException:
        services.stop_group(proc)
        raise


def _finish_start(
    proc: subprocess.Popen[bytes] | None, base_url: str, target: UiTarget, log_file: Path | None
) -> UiServer:
    exp = get_experiment(base_url, target.experiment)
    has_view = exp is not None and ensure_landing_view(base_url, exp, target.task_metric)
    exp_id = None if exp is None else str(exp["experiment_id"])
    return UiServer(proc, base_url, target, exp_id, log_file, has_view)


def serve_ui(
    target: UiTarget,
    host: str = services.LOOPBACK,
    port: int = 5000,
    *,
    block: bool = True,
    timeout: float = 90.0,
    out: TextIO | None = None,
) -> UiServer:
    """Start the UI and print its URLs; with ``block``, serve until Ctrl-C/SIGTERM/SIGHUP."""
    out = out or sys.stdout
    with services.stop_on_signals():
        server = start_ui(target, host, port, timeout)
        try:
            _print_urls(server, out)
            if block and server.process is not None:
                server.process.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if block:
                server.stop()
    return server


def _print_urls(server: UiServer, out: TextIO) -> None:
    if server.experiment_id is None:
        log.warning(
            "experiment %r does not exist yet in %s", server.target.experiment,
            server.target.tracking_uri,
        )  # fmt: skip
    # the URL is the command's output (what `mmpipe ui` is for), so it goes to stdout
    print(f"MLflow UI: {server.runs_url}", file=out)
    print(f"  registered model: {server.model_url}", file=out)
    if server.process is None:
        print(f"  (served by the tracking server {server.base_url}; nothing started)", file=out)
    else:
        print(f"  log: {server.log_file}   (Ctrl-C stops the UI)", file=out)
    out.flush()
