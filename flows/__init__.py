"""Prefect flows. Importing this package points Prefect's state at the project (PREFECT_HOME under
.mmpipe/) unless the environment already says otherwise, and keeps model hubs offline."""

import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path.cwd().resolve() / ".mmpipe" / "prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
