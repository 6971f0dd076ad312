"""Start the MLflow UI on a project's tracking store and point the user at the runs table.

    mmpipe ui [--project-dir .] [--port 5000]

The UI is ``python -m mlflow server`` in a subprocess (this module never imports mlflow, so the
CLI stays fast), bound to 127.0.0.1, reading the project's store: backend
``sqlite:///<project>/.mmpipe/mlflow.db`` and artifacts ``<project>/.mmpipe/mlartifacts`` (the
defaults of ``mmpipe/tracking.py``). Its log goes to ``<project>/.mmpipe/ui.log``.

MLflow 3.17 opens in "GenAI" mode (a traces overview). That mode is a *UI-wide* setting, not an
experiment property: the web app keeps ``workflowType`` ("genai" | "machine_learning") in browser
localStorage (key ``mlflow.workflowType``, default "genai"), and a ``?workflowType=...`` query
parameter in the page's hash route overrides it. The experiment tag ``mlflow.experimentKind`` is
ignored for this choice in 3.17 (its feature flag is hard-wired on). So the printed URL carries the
parameter: ``http://127.0.0.1:5000/#/experiments/<id>/runs?workflowType=machine_learning``.

The 3.17 runs table also shows no metric columns by default (only Source, Models, Dataset), and
column choices live in localStorage, not the URL. A *shared view* can carry them: the experiment
tag ``mlflow.sharedViewState.<key>`` holds the view state as JSON (``{"selectedColumns":
["metrics.`accuracy`", ...]}``) and ``&viewStateShareKey=<key>`` in the URL applies it. So
``start_ui`` keeps the tag ``mlflow.sharedViewState.mmpipe-training`` listing the metrics of the
latest runs (it only rewrites a tag it wrote itself, marked ``"mmpipeAuto": true``; a tag someone
else wrote, e.g. tracking.py at experiment creation, is left alone) and links to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from mmpipe.errors import InputError, MmpipeError

log = logging.getLogger(__name__)

EXPERIMENT = "mmpipe"
REGISTERED_MODEL = "mmpipe-fusion"
# The UI's "Model training" mode (see the module docstring): a query parameter of the hash route.
ML_MODE = "workflowType=machine_learning"
VIEW_KEY = "mmpipe-training"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
MAX_METRIC_COLUMNS = 16


def store_paths(project_dir: str | Path) -> tuple[Path, Path]:
    """The project's MLflow sqlite DB and artifacts directory (absolute)."""
    state = Path(project_dir).resolve() / ".mmpipe"
    return state / "mlflow.db", state / "mlartifacts"


def ui_command(project_dir: str | Path, host: str = "127.0.0.1", port: int = 5000) -> list[str]:
    """The argv that serves the MLflow UI + REST API on the project's store."""
    db, artifacts = store_paths(project_dir)
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db.as_posix()}",
        # experiments created through the UI/REST API put artifacts beside the DB too
        "--artifacts-destination", artifacts.as_posix(),
        "--host", host,
        "--port", str(port),
        "--workers", "1",  # a local single-user UI; more workers only slow the start
    ]  # fmt: skip


def runs_url(base_url: str, experiment_id: str | None, view: bool = False) -> str:
    """The "Model training" runs table of an experiment (or the experiment list if none yet)."""
    if experiment_id is None:
        return f"{base_url}/#/experiments?{ML_MODE}"
    share = f"&viewStateShareKey={VIEW_KEY}" if view else ""
    return f"{base_url}/#/experiments/{experiment_id}/runs?{ML_MODE}{share}"


def model_url(base_url: str, name: str = REGISTERED_MODEL) -> str:
    """The registered model's page (its versions and aliases)."""
    return f"{base_url}/#/models/{urllib.parse.quote(name)}?{ML_MODE}"


@dataclass
class UiServer:
    """A running MLflow UI subprocess; ``stop()`` ends it (and its workers)."""

    process: subprocess.Popen[bytes]
    base_url: str
    experiment_id: str | None
    log_file: Path
    has_view: bool = False
    runs_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.runs_url = runs_url(self.base_url, self.experiment_id, self.has_view)

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server's process group, then kill it if it lingers."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait(timeout)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # the server runs in its own session (start_new_session), so its group id is its pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode())


def _post_json(url: str, body: dict, timeout: float = 10.0) -> dict:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read().decode() or "{}")


def get_experiment(base_url: str, name: str = EXPERIMENT) -> dict | None:
    """Experiment ``name`` as the REST API returns it, or None if it does not exist yet."""
    query = urllib.parse.urlencode({"experiment_name": name})
    try:
        body = _get_json(f"{base_url}/api/2.0/mlflow/experiments/get-by-name?{query}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:  # RESOURCE_DOES_NOT_EXIST
            return None
        raise
    return body["experiment"]


def experiment_id(base_url: str, name: str = EXPERIMENT) -> str | None:
    """The id of experiment ``name`` via the REST API, or None if it does not exist yet."""
    exp = get_experiment(base_url, name)
    return None if exp is None else str(exp["experiment_id"])


def _recent_metric_keys(base_url: str, exp_id: str) -> list[str]:
    body = _post_json(
        f"{base_url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp_id], "max_results": 50, "order_by": ["attributes.start_time DESC"]},
    )
    keys = {
        m["key"] for run in body.get("runs", []) for m in run.get("data", {}).get("metrics", [])
    }
    return sorted(keys)[:MAX_METRIC_COLUMNS]


def ensure_training_view(base_url: str, exp: dict) -> bool:
    """Keep the shared view with the recent runs' metric columns; True if the view exists."""
    tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
    if VIEW_TAG in tags:
        try:
            if not json.loads(tags[VIEW_TAG]).get("mmpipeAuto"):
                return True  # someone chose this view on purpose: leave it
        except (ValueError, AttributeError):
            return True
    metrics = _recent_metric_keys(base_url, str(exp["experiment_id"]))
    if not metrics:
        return VIEW_TAG in tags
    state = {
        "selectedColumns": [
            "attributes.`Source`",
            "attributes.`Models`",
            *(f"metrics.`{k}`" for k in metrics),
        ],
        "mmpipeAuto": True,  # ours: safe to refresh when new metrics appear
    }
    value = json.dumps(state)
    if tags.get(VIEW_TAG) != value:
        _post_json(
            f"{base_url}/api/2.0/mlflow/experiments/set-experiment-tag",
            {"experiment_id": str(exp["experiment_id"]), "key": VIEW_TAG, "value": value},
        )
    return True


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _wait_healthy(
    proc: subprocess.Popen[bytes], base_url: str, log_file: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise MmpipeError(
                f"the MLflow UI exited with code {proc.returncode} before answering; "
                f"last lines of {log_file}:\n{_log_tail(log_file)}"
            )
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise MmpipeError(
        f"the MLflow UI did not answer on {base_url} within {timeout:.0f} s; see {log_file}"
    )


def start_ui(
    project_dir: str | Path, host: str = "127.0.0.1", port: int = 5000, timeout: float = 90.0
) -> UiServer:
    """Start the UI subprocess on the project's store and wait until it answers; don't block."""
    db, artifacts = store_paths(project_dir)
    if not db.is_file():
        raise InputError(
            f"no MLflow store at {db}: run the pipeline first (`mmpipe run` or "
            f"`python -m flows.nightly --project-dir {Path(project_dir)}`)"
        )
    if port_in_use(host, port):
        raise InputError(f"port {port} on {host} is already in use: pass another --port")
    artifacts.mkdir(parents=True, exist_ok=True)
    log_file = db.parent / "ui.log"
    base_url = f"http://{host}:{port}"
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            ui_command(project_dir, host, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # one process group: stop() ends the workers too
            cwd=db.parent,  # anything MLflow writes relative to the cwd stays in .mmpipe/
        )
    try:
        _wait_healthy(proc, base_url, log_file, timeout)
        exp = get_experiment(base_url)
        has_view = exp is not None and ensure_training_view(base_url, exp)
    except BaseException:
        UiServer(proc, base_url, None, log_file).stop()
        raise
    exp_id = None if exp is None else str(exp["experiment_id"])
    return UiServer(proc, base_url, exp_id, log_file, has_view)


def serve_ui(
    project_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 5000,
    *,
    block: bool = True,
    timeout: float = 90.0,
    out: TextIO | None = None,
) -> UiServer:
    """Start the UI, print the runs-table URL; with ``block`` serve until Ctrl-C, then stop it."""
    out = out or sys.stdout
    server = start_ui(project_dir, host, port, timeout)
    if server.experiment_id is None:
        log.warning(
            "experiment %r does not exist yet in %s", EXPERIMENT, store_paths(project_dir)[0]
        )
    # the URL is the command's output (what `mmpipe ui` is for), so it goes to stdout
    print(f"MLflow UI: {server.runs_url}", file=out)
    print(f"  registered model: {model_url(server.base_url)}", file=out)
    print(f"  log: {server.log_file}   (Ctrl-C stops the UI)", file=out, flush=True)
    if not block:
        return server
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return server
