"""Prefect flows. Importing this package points Prefect's state at the project (PREFECT_HOME under
.mmpipe/) unless the environment already says otherwise, and keeps model hubs offline."""

import logging
import os
from pathlib import Path

from mmpipe.layout import Layout

os.environ.setdefault("PREFECT_HOME", str(Layout(Path.cwd().resolve()).prefect_home))
# Prefect warns at import when its home is missing; a fresh clone has no .mmpipe/ yet.
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The ephemeral server creates and migrates its SQLite DB on the first run of a fresh clone; on 2
# busy cores that took longer than Prefect's 20 s default ("Timed out while attempting to connect
# to ephemeral Prefect API server", measured on a fresh machine).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# mmpipe's own log lines (per-epoch metrics, skipped stages, counts) go to the flow run's log.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mmpipe")
# MLflow draws a "Downloading artifacts" progress bar for every model it loads back (register
# validates the logged model's input example): noise in the flow's log.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
logging.getLogger("mmpipe").setLevel(logging.INFO)
