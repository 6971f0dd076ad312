"""Where runs go, and the one client every tracking call goes through.

``MLFLOW_TRACKING_URI`` (env) > ``tracking.uri`` (params) > the project's default
``sqlite:///<project>/.mmpipe/mlflow.db`` (absolute), with artifacts in
``<project>/.mmpipe/mlartifacts``. For any sqlite URI the experiment's artifacts go to
``mlartifacts/`` beside the database file, never to the current directory.

``connect(p, root)`` returns a ``Store``: the URI, the experiment and an ``MlflowClient`` bound
to that URI. Every run, param, metric, artifact and registry call goes through that client. A few
MLflow functions exist only in the fluent API (logging and registering a model, which need an
active run or the global registry URI); ``connect`` also points the fluent API at the same URI,
and ``mmpipe.tracking.models`` / ``registry`` use it for those calls only.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mmpipe.commit import pid_alive
from mmpipe.config import TrackingParams
from mmpipe.layout import Layout, sqlite_path, store_uri

log = logging.getLogger(__name__)

_initialised: set[tuple[str, str]] = set()
# mlflow.set_tracking_uri() also *exports* MLFLOW_TRACKING_URI (for its subprocesses). That value is
# ours, not the user's choice: remember it, so a second project in the same process (tests, the
# benchmarks, a notebook) is not silently logged into the first project's store.
_ENV_AT_IMPORT = os.environ.get("MLFLOW_TRACKING_URI")
_exported_by_us: str | None = None


@dataclass(frozen=True)
class Store:
    """One tracking store and experiment, and the client bound to it."""

    uri: str
    experiment_id: str
    client: MlflowClient

    def run(self, run_id: str) -> Run:
        """A handle on an existing run of this store."""
        return Run(self, run_id)


@dataclass(frozen=True)
class Run:
    """A run of a store: what logging functions take."""

    store: Store
    id: str

    @property
    def client(self) -> MlflowClient:
        """The store's client."""
        return self.store.client


def tracking_uri(p: TrackingParams | None, root: str | Path) -> str:
    """The tracking URI: env MLFLOW_TRACKING_URI, else params, else the project's sqlite DB.

    A relative sqlite path in params (``sqlite:///x.db``) is taken relative to ``root``.
    """
    return _user_env_uri() or store_uri(p.uri if p is not None else None, root)


def artifact_location(uri: str, artifacts: str | None = None, root: str | Path = ".") -> str | None:
    """Where a new experiment's artifacts go.

    A sqlite store: beside the DB file. A tracking server (``http(s)://``): it decides. A database
    (PostgreSQL, MySQL): ``tracking.artifacts`` (an object-store URL such as ``s3://b/prefix``),
    else the project's ``.mmpipe/mlartifacts`` (never MLflow's default, ``./mlruns`` of the cwd).
    """
    db = sqlite_path(uri)
    if db is not None:
        return (db.resolve().parent / "mlartifacts").as_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if artifacts:
        return artifacts.rstrip("/")
    return (Layout(Path(root).resolve()).state_dir / "mlartifacts").as_uri()


def connect(p: TrackingParams | None, root: str | Path) -> Store:
    """The store of ``p`` for the project at ``root``; creates the DB and experiment once.

    Call it before launching parallel workers: SQLite's first-start schema migration races when
    several processes start at once (mlflow#6490). A file lock serialises the creation
    across processes; later calls in this process are cheap.
    """
    p = p or TrackingParams()
    uri = tracking_uri(p, root)
    _point_fluent_api_at(uri)
    if (uri, p.experiment) not in _initialised:
        db = sqlite_path(uri)
        with _init_lock(uri):  # the first store access (even building a client) migrates the schema
            if db is not None:
                db.parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # tracking store tables
            client.search_registered_models(max_results=1)  # registry store tables
            _ensure_experiment(client, p.experiment, artifact_location(uri, p.artifacts, root))
        _initialised.add((uri, p.experiment))
        store = _store(uri, p.experiment)
        end_dead_runs(store)
        return store
    return _store(uri, p.experiment)


def _init_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """Serialises the first access of a store: a file lock beside a SQLite DB (one host), an
    advisory lock on a PostgreSQL one (every host: two first nights on an empty database both
    ran MLflow's migration and one failed with a duplicate key in pg_type, tested)."""
    db = sqlite_path(uri)
    if db is not None:
        return file_lock(db.with_name(db.name + ".lock"))
    if is_postgres(uri):
        return pg_advisory_lock(uri, "mmpipe:schema")
    return contextlib.nullcontext()


def is_postgres(uri: str) -> bool:
    """True for a PostgreSQL store URI (``postgresql://``, ``postgresql+psycopg2://``, ...)."""
    return uri.startswith(("postgresql", "postgres:"))


@contextlib.contextmanager
def pg_advisory_lock(uri: str, name: str) -> Iterator[None]:
    """Hold ``pg_advisory_xact_lock`` on a key derived from ``name`` in the database of ``uri``
    (its own connection and transaction; released when the block ends, or the process dies)."""
    from sqlalchemy import create_engine, text

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") - (1 << 63)
    engine = create_engine(uri.replace("postgres://", "postgresql://", 1))
    try:
        with engine.begin() as conn:  # the lock lasts until this transaction ends
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
            yield
    finally:
        engine.dispose()


def _store(uri: str, experiment: str) -> Store:
    client = MlflowClient(uri, registry_uri=uri)
    return Store(uri, client.get_experiment_by_name(experiment).experiment_id, client)


PID_TAG, HOST_TAG = "mmpipe.pid", "mmpipe.host"


def owner_tags() -> dict[str, str]:
    """Tags every run gets at creation: which process of which host runs it."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def end_dead_runs(store: Store) -> list[str]:
    """End KILLED the RUNNING runs of this host whose process is gone (kill -9, OOM, power).

    Runs when a process first opens the store, so a killed night's runs do not stay RUNNING
    forever. Another host's runs are left alone (whether their process lives is unknowable here).
    """
    host = socket.gethostname()  # [A-Za-z0-9.-]: nothing to quote
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    ended = []
    for run in store.client.search_runs([store.experiment_id], query, max_results=1000):
        pid = run.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            store.client.set_tag(run.info.run_id, "mmpipe.ended", "its process was gone")
            store.client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    if ended:
        log.warning("MLflow: %d run(s) of killed processes marked KILLED: %s", len(ended), ended)
    return ended


def _ensure_experiment(client: MlflowClient, name: str, location: str | None) -> None:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        with contextlib.suppress(MlflowException):  # another process won the race
            client.create_experiment(name, artifact_location=location)
    elif exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)


def _user_env_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and (env != _exported_by_us or env == _ENV_AT_IMPORT):
        return env
    return None


def _point_fluent_api_at(uri: str) -> None:
    global _exported_by_us
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _exported_by_us = os.environ.get("MLFLOW_TRACKING_URI")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
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


def point_fluent_api_at(store: Store) -> None:
    """Make MLflow's fluent functions (model logging, registering) use ``store``'s URI."""
    _point_fluent_api_at(store.uri)
