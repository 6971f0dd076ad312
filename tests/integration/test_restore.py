"""`mmpipe restore` (README "Restore a past night / an experiment") on a one-stage DVC project:
it brings a committed night's output back, and when dvc.lock names a hash that is in no cache it
refuses in one line and deletes nothing, where `dvc checkout` deletes the output and fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import git_env

pytestmark = pytest.mark.slow  # a dozen git and dvc processes

DVC_YAML = {
    "stages": {
        "make": {
            "cmd": "mkdir -p out && cp src/a out/a",
            "deps": ["src/a"],
            "outs": [{"out": {"persist": True}}],  # as data/shards: persist does not save it
        }
    }
}


def _run(project: Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=project, env=git_env(), capture_output=True, text=True, timeout=300
    )


def _ok(project: Path, *cmd: str) -> str:
    proc = _run(project, *cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _restore(project: Path) -> subprocess.CompletedProcess:
    return _run(project, sys.executable, "-m", "mmpipe", "restore", "--project-dir", ".")


def _night(project: Path, value: str) -> None:
    (project / "src" / "a").write_text(value)
    _ok(project, sys.executable, "-m", "dvc", "repro", "--quiet")
    _ok(project, "git", "add", "-A")
    _ok(project, "git", "commit", "-qm", f"night {value}")


def test_restore_brings_a_night_back_and_refuses_a_hash_in_no_cache(tmp_path):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    _ok(project, "git", "init", "-q")
    _ok(project, sys.executable, "-m", "dvc", "init", "-q")
    _night(project, "1")
    _night(project, "2")

    _ok(project, "git", "checkout", "-q", "HEAD~1")  # a past night: its lock, its source
    restored = _restore(project)
    assert restored.returncode == 0, restored.stderr
    assert (project / "out" / "a").read_text() == "1"

    # a lock made elsewhere (its hash is in no cache here): refused, the output kept
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    lock["stages"]["make"]["outs"][0]["md5"] = "0" * 32 + ".dir"
    (project / "dvc.lock").write_text(yaml.safe_dump(lock))
    refused = _restore(project)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "out (make)" in lines[0] and "dvc repro make" in lines[0], lines
    assert (project / "out" / "a").read_text() == "1"  # nothing deleted
