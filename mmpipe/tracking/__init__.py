"""MLflow tracking and registry: the ONLY mmpipe package that imports mlflow.

    store.py     where runs go (env > params > <project>/.mmpipe/mlflow.db); ``connect`` gives
                 the Store whose client every call goes through
    runs.py      runs nested under a flow's parent run; params, metrics, artifacts
    models.py    log a trained model as a pyfunc that serves outside the repo (its code and
                 requirements inside), fetch one back (``resolve_model``)
    registry.py  versions and the champion alias, moved only on improvement
    results.py   a night's headline metrics on the flow's run, a version's model card and scores

Callers connect once at the edge (``connect(params.tracking, project_dir)``, or through
``start_run``) and pass the ``Run`` handle down.
"""

import os

# MLflow's client telemetry off, as Prefect's analytics are (before mlflow is first imported);
# an explicit MLFLOW_DISABLE_TELEMETRY=false in the environment still wins
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mmpipe.tracking.models import (  # noqa: E402 - after the telemetry switch
    FusionPyfunc,
    ServingInputError,
    champion_uri,
    download_model,
    has_champion,
    is_model_uri,
    load_pyfunc,
    log_model,
    model_version,
    resolve_model,
    serving_requirements,
    try_download_model,
)
from mmpipe.tracking.registry import register_and_maybe_promote
from mmpipe.tracking.results import describe_version, log_flow_results, version_info
from mmpipe.tracking.runs import (
    PARENT_ENV,
    close_parent_run,
    create_run,
    epoch_logger,
    git_commit,
    log_artifacts,
    log_evaluation,
    log_metrics,
    log_params,
    log_stage_run,
    numeric,
    open_parent_run,
    start_run,
)
from mmpipe.tracking.store import Run, Store, artifact_location, connect, tracking_uri

__all__ = [
    "PARENT_ENV",
    "FusionPyfunc",
    "Run",
    "ServingInputError",
    "Store",
    "artifact_location",
    "champion_uri",
    "has_champion",
    "close_parent_run",
    "connect",
    "create_run",
    "describe_version",
    "download_model",
    "epoch_logger",
    "git_commit",
    "is_model_uri",
    "load_pyfunc",
    "log_artifacts",
    "log_evaluation",
    "log_flow_results",
    "log_metrics",
    "log_model",
    "model_version",
    "log_params",
    "log_stage_run",
    "numeric",
    "open_parent_run",
    "register_and_maybe_promote",
    "resolve_model",
    "serving_requirements",
    "start_run",
    "tracking_uri",
    "try_download_model",
    "version_info",
]
