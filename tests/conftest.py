"""Shared fixtures: tiny generated data, the real samples in ../shared/data, CPU only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The real image+text samples beside the repo (../shared/data); CI always has them."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real samples missing: expected {SHARED_DATA} (CI clones shared/ beside the repo)")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when CUDA is absent; everything else always runs."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
