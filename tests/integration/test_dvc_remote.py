"""A DVC remote on the object store (dvc-s3 against the local S3 server): `dvc push` the stage
outputs of ingest, align and shard, lose them and the cache, `dvc pull` them back byte for byte."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tests.conftest import make_project
from tests.integration.test_dvc import _dvc

pytestmark = pytest.mark.slow


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_push_then_pull_restores_every_stage_output(tmp_path, s3):
    project = make_project(tmp_path / "proj")
    _dvc(project, "repro", "shard")
    before = _digest(project / "data")
    remote = s3.url("dvc", tmp_path.name)
    _dvc(project, "remote", "add", "-d", "store", remote)
    # the endpoint is this machine's: --local keeps it out of the committed .dvc/config
    _dvc(project, "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
    pushed = _dvc(project, "push")
    assert "pushed" in pushed, pushed

    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    _dvc(project, "pull", "--with-deps", "shard")  # what was reproduced: ingest, align, shard
    assert _digest(project / "data") == before
    assert "up to date" in _dvc(project, "status", "--with-deps", "shard").lower()
