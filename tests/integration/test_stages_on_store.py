"""train / evaluate / register on shards published at ``shard.output`` (the local S3 server):
the project that published them reads the version its manifest names (no local tars needed), a
machine with no local shards at all reads the version ``LATEST`` names, and both train the same
model as from the local directory; the credentials never reach the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmpipe import pipeline, storage
from mmpipe.config import load_params
from mmpipe.errors import InputError
from mmpipe.layout import Layout
from tests.conftest import REPO, TINY_OVERRIDES, write_mood_shards

pytestmark = pytest.mark.slow


def _weights(layout: Layout) -> dict[str, torch.Tensor]:
    return torch.load(layout.model_dir / "last.pt", weights_only=True)["model"]


def _mmpipe(project, s3, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "mmpipe", *args, "--project-dir", str(project)]
    env = {**os.environ, **s3.env, "TQDM_DISABLE": "1"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MMPIPE_PARENT_RUN_ID"):
        env.pop(var, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_train_and_evaluate_read_the_published_version(tmp_path, s3):
    url = s3.url("stages", tmp_path.name)
    overrides = [*TINY_OVERRIDES, f"shard.output={url}"]
    params = load_params(REPO / "params.yaml", overrides)
    local = Layout(tmp_path / "local")  # the same data, trained from data/shards/
    for stage in ("ingest", "curate", "align", "shard", "train"):
        pipeline.run_stage(stage, load_params(REPO / "params.yaml", TINY_OVERRIDES), local)

    here = Layout(tmp_path / "here")
    for stage in ("ingest", "curate", "align", "shard"):
        pipeline.run_stage(stage, params, here)
    manifest = (here.shard_dir / "manifest.json").read_bytes()
    for tar in here.shard_dir.glob("*.tar"):
        tar.unlink()  # only the store holds them now: train must read the URL
    version, data_hash = pipeline.shard_source(params, here)
    assert version == storage.pinned_version(url, data_hash) and str(version).startswith(url)
    assert data_hash == pipeline.manifest_hash(local)

    # another project publishes newer shards to the same URL: this one still reads its version
    other = write_mood_shards(tmp_path / "other", {"train": 8, "val": 4, "test": 4})
    storage.publish_shards(other, url)
    assert pipeline.shard_source(params, here)[0] == version
    trained = pipeline.run_stage("train", params, here)
    assert trained["data_hash"] == data_hash
    for name, tensor in _weights(local).items():
        assert torch.equal(tensor, _weights(here)[name]), name
    metrics = pipeline.run_stage("evaluate", params, here)
    scored = json.loads((here.eval_dir / "evaluation_report.json").read_text())["scored"]
    assert scored["data_sha256"] == data_hash and metrics["n_test_pairs"] > 0
    assert pipeline.run_stage("register", params, here)["version"] == 1

    # a node with no local shards at all reads what LATEST names (now the other project's)
    node = tmp_path / "node"
    node.mkdir()
    (node / "params.yaml").write_text((REPO / "params.yaml").read_text())
    sets = [a for o in overrides for a in ("--set", o)]
    latest = storage.resolve_shards(url)[0]
    assert latest != version
    train = _mmpipe(node, s3, "train", *sets)
    assert train.returncode == 0, train.stderr[-3000:]
    evaluate = _mmpipe(node, s3, "evaluate", *sets)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads((node / "models" / "train_report.json").read_text())
    assert latest.endswith(report["data_hash"][:16])
    scored = json.loads((node / "reports" / "evaluation_report.json").read_text())["scored"]
    assert scored["data_sha256"] == report["data_hash"]
    for out in (train, evaluate):
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in out.stdout + out.stderr
    assert manifest == (here.shard_dir / "manifest.json").read_bytes()


def test_a_version_missing_from_the_store_names_it(tmp_path, s3):
    """Local shards that were never published there: an error naming the version, not a
    traceback from the S3 client."""
    url = s3.url("never", tmp_path.name)
    params = load_params(REPO / "params.yaml", [*TINY_OVERRIDES, f"shard.output={url}"])
    layout = Layout(tmp_path)
    layout.shard_dir.mkdir(parents=True)
    shutil.copy(write_mood_shards(tmp_path / "s") / "manifest.json", layout.shard_dir)
    with pytest.raises(InputError, match=r"v-[0-9a-f]{16}/manifest.json: no such object"):
        pipeline.shard_source(params, layout)
