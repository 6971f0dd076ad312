"""The fault battery's harness: a tiny project built once per session and copied per test, the
commands run as users run them (subprocesses), kill points from ``mmpipe.faults``.

Every test here is marked ``faults`` (``pytest -m faults`` runs the battery alone) and ``slow``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, TINY_OVERRIDES

KILLED = -signal.SIGKILL
TERMINATED = 128 + signal.SIGTERM  # what mmpipe exits with after a SIGTERM (the shell's 143)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.slow)  # subprocesses that import torch: seconds each


def write_project(dest: Path, overrides: list[str] | None = None) -> Path:
    """A project directory: params.yaml = the repo's with the tiny overrides (+ ``overrides``)."""
    from mmpipe.config import load_params

    dest.mkdir(parents=True, exist_ok=True)
    params = load_params(REPO / "params.yaml", [*TINY_OVERRIDES, *(overrides or [])])
    (dest / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return dest


def env(fault: str | None = None, signal_name: str | None = None) -> dict[str, str]:
    """The environment of a command: the fault to inject, no progress bars, and none of the
    tracking URIs an in-process MLflow call of an earlier test exported (the command must use
    its project's store)."""
    drop = ("MMPIPE_FAULT", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MMPIPE_PARENT_RUN_ID")
    out = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    out["TQDM_DISABLE"] = "1"
    if fault:
        out["MMPIPE_FAULT"] = fault
    if signal_name:
        out["MMPIPE_FAULT_SIGNAL"] = signal_name
    return out


def mmpipe(
    project: Path,
    *args: str,
    fault: str | None = None,
    signal_name: str | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``python -m mmpipe ARGS --project-dir PROJECT``, as a user (or dvc.yaml) runs it."""
    cmd = [sys.executable, "-m", "mmpipe", *args, "--project-dir", str(project)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env(fault, signal_name), timeout=timeout
    )


def popen_mmpipe(project: Path, *args: str, **kwargs) -> subprocess.Popen[str]:
    """``mmpipe`` started in the background (races, external signals)."""
    cmd = [sys.executable, "-m", "mmpipe", *args, "--project-dir", str(project)]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        **kwargs,
    )


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) -> its sha256; {} when it is absent."""
    if not directory.exists():
        return {}
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(project: Path) -> list[str]:
    """What an interrupted run may leave and the next run must remove: staging and replaced
    versions of a stage (mmpipe.commit), temp files of atomic writes."""
    found = []
    for p in project.rglob("*"):
        rel = p.relative_to(project).as_posix()
        if rel.startswith(".mmpipe/"):
            continue  # MLflow's and Prefect's own files
        if ".staging-" in p.name or ".old-" in p.name or p.name.endswith(".tmp"):
            found.append(rel)
    return sorted(found)


def one_line(stderr: str) -> str:
    """The last line a failed command printed (its message), checking there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    """A tiny project after one full `mmpipe run` (data, model, reports, champion v1)."""
    # no fusion ablation: evaluate's 8 extra heads cost seconds per command and no fault is in them
    project = write_project(
        tmp_path_factory.mktemp("built") / "project", ["evaluate.ablation=false"]
    )
    proc = mmpipe(project, "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return project


@pytest.fixture
def project(built, tmp_path) -> Path:
    """A private copy of the built project."""
    dest = tmp_path / "project"
    shutil.copytree(built, dest, symlinks=True)
    return dest


def client(project: Path):
    """An MLflow client on the project's store, for runs and registry alike (an earlier test in
    this process may have pointed MLflow's global registry URI elsewhere)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def weights(checkpoint: Path) -> dict[str, bytes]:
    """A checkpoint's model weights as bytes (training reports carry timings; weights do not)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return {k: v.numpy().tobytes() for k, v in state.items()}
