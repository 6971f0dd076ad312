"""Shared fixtures: tiny generated data, the real samples in ../shared/data, CPU only."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never touch the user's state. `make test` exports PREFECT_HOME=<repo>/.mmpipe/prefect (and
# flows/__init__ defaults to the cwd's): Prefect's DB and persisted task results of the tests'
# temporary projects went there. A shell may also point at a shared Prefect API or MLflow server.
# Set before anything imports prefect (its settings are read at import); inherited by subprocesses.
# A subprocess of the test session that imports this module (a benchmark script) keeps the
# isolated PREFECT_HOME its environment already has, and creates no directory of its own.
_INHERITED = os.environ.get("MMPIPE_TEST_PREFECT_HOME")
if _INHERITED:
    TEST_PREFECT_HOME = Path(_INHERITED)
else:
    TEST_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="mmpipe-tests-prefect-"))
    os.environ["MMPIPE_TEST_PREFECT_HOME"] = str(TEST_PREFECT_HOME)
    os.environ["PREFECT_HOME"] = str(TEST_PREFECT_HOME)
    for _var in (
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_PROFILE",
        "PREFECT_PROFILES_PATH",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_LOCAL_STORAGE_PATH",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
    ):
        os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The real image+text samples beside the repo (../shared/data); CI always has them."""
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real samples missing: expected {SHARED_DATA} (CI clones shared/ beside the repo)"
        )
    return SHARED_DATA


def pytest_sessionfinish(session, exitstatus):
    """Remove the tests' Prefect home (the session that created it)."""
    if not _INHERITED:
        shutil.rmtree(TEST_PREFECT_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when CUDA is absent; everything else always runs."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A whole-pipeline configuration small enough for seconds-long integration tests.
TINY_OVERRIDES = [
    "ingest.synthetic.n_images=48",
    "ingest.synthetic.captions_per_image=2",
    "ingest.synthetic.image_size=32",
    "ingest.workers=1",
    "shard.image_size=32",
    "shard.copies=0",
    "shard.workers=1",
    "shard.maxcount=40",
    "train.epochs=1",
    "train.batch_size=16",
    "train.width=16",
    "train.embed_dim=16",
    "train.head_hidden=16",
    "train.warmup_steps=1",
    "train.num_workers=0",
    "train.shuffle_buffer=0",
    "evaluate.ablation_epochs=1",
    "evaluate.batch_size=64",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """--set overrides that make every stage run in a second or two."""
    return list(TINY_OVERRIDES)


def make_project(dest: Path, overrides: list[str] | None = None) -> Path:
    """A fresh project directory (git + dvc) holding the repo's pipeline files and tiny params."""
    import shutil
    import subprocess

    import yaml

    from mmpipe.config import load_params

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "mmpipe", dest / "mmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    params = load_params(REPO / "params.yaml", overrides or TINY_OVERRIDES)
    (dest / "params.yaml").write_text(
        yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
    )
    (dest / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def git_env() -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, a git identity, offline hubs."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="mmpipe-tests",
        GIT_AUTHOR_EMAIL="tests@mmpipe.invalid",
        GIT_COMMITTER_NAME="mmpipe-tests",
        GIT_COMMITTER_EMAIL="tests@mmpipe.invalid",
    )
    return env
