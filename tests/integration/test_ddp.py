"""2-process gloo DDP under torchrun == one process with the same global batch.

Full-batch steps (global batch = the whole train split) make the comparison independent of how
mmpipe.data splits samples between ranks: both runs see exactly the same samples per step. The
contrastive loss is computed over the gathered global batch and the task loss is normalised by
the global labelled count, so the only differences left are float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpipe.data import create_dataloader
from mmpipe.storage import publish_shards
from mmpipe.train import run_train
from tests.conftest import tiny_train_params, write_mood_shards

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, sys
from pathlib import Path
from mmpipe.config import TrainParams
from mmpipe.train import run_train
p = TrainParams.model_validate(json.loads(sys.argv[1]))
run_train(sys.argv[2], p, Path(sys.argv[3]))  # a directory or a published set's URL
"""


def _torchrun(launcher: list[str], script: Path, p, shards: Path | str, out: Path):
    """Start ``torch.distributed.run <launcher> script`` (output to ``<out>.log``); not waited."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(script)]
    cmd += [p.model_dump_json(), str(shards), str(out)]
    log = out.with_suffix(".log").open("w")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    log.close()  # the child holds its own copy
    return proc, out.with_suffix(".log")


def _kill(proc: subprocess.Popen) -> None:
    """The agent and its workers (its own process group), if still running."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _finish(agent: tuple[subprocess.Popen, Path], timeout: int) -> None:
    proc, log = agent
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _assert_same_training(single_run: tuple[dict, Path], ddp_dir: Path) -> None:
    single, single_dir = single_run
    report = json.loads((ddp_dir / "train_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == single["steps"] == 3
    a = torch.load(single_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(ddp_dir / "last.pt", weights_only=True)["model"]
    for k in a:
        # 1e-4: attention key biases get a mathematically-zero gradient whose float noise Adam
        # normalises into steps of up to lr; they differ by ~3e-5 after 3 steps, all else ~1e-7
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
    hist = single["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # it trained: the match is not vacuous
    for key in ("train_loss", "train_contrastive", "train_task"):
        assert report["history"][-1][key] == pytest.approx(single["history"][-1][key], rel=1e-4)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """Shards, the params, a single-process run of them (in ``single/``) and the worker script;
    trained once for both comparisons."""
    tmp = tmp_path_factory.mktemp("ddp")
    # a sample per image with its 2 captions (what shard writes): training reads one caption
    # per image, chosen alike on every rank
    shards = write_mood_shards(
        tmp / "shards", {"train": 32, "val": 4}, per_shard=16, layout="image"
    )
    # 32 train samples in 2 shards; batch 32 = one full-batch step per epoch, 16 per rank
    p = tiny_train_params(epochs=3, batch_size=32, dropout=0.0, shuffle_buffer=0, lr=1e-3)
    single = run_train(shards, p, tmp / "single")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    return shards, p, (single, tmp / "single"), script


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes_match_single_process(tmp_path, trained_once):
    shards, p, single, script = trained_once
    launcher = ["--nproc_per_node=2", "--standalone"]
    _finish(_torchrun(launcher, script, p, shards, tmp_path / "ddp"), 110)
    _assert_same_training(single, tmp_path / "ddp")


def _rank_keys(url: str, rank: int) -> list[str]:
    loader = create_dataloader(url, "train", 64, rank=rank, world_size=2, captions="one")
    return [key for batch in loader for key in batch["key"]]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_torchrun_agents_as_two_nodes_match_single_process(tmp_path, trained_once, s3):
    """Two agents (stand-ins for two nodes) meet at a c10d rendezvous; one rank each, gloo;
    both read the shards from the object store (the local S3 server), as nodes without a
    shared disk do.

    The real multi-node command is the same with the first node's address as the endpoint
    (docs/scaling-out.md); rank 0 alone writes the checkpoint and report.
    """
    local, p, single, script = trained_once
    shards = publish_shards(local, s3.url("ddp", tmp_path.name))["url"]
    ranks = [_rank_keys(shards, rank) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 16 and not set(ranks[0]) & set(ranks[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        f"--rdzv_id=mmpipe-test-{port}",
    ]
    # each agent writes under its own out dir: only rank 0's may hold a checkpoint
    agents = [_torchrun(launcher, script, p, shards, tmp_path / f"node{i}") for i in (0, 1)]
    try:
        for agent in agents:
            _finish(agent, 140)
    finally:  # one agent failing leaves the other waiting at the rendezvous
        for proc, _ in agents:
            _kill(proc)
    for _, log in agents:
        assert s3.env["AWS_SECRET_ACCESS_KEY"] not in log.read_text()
    written = [d for d in (tmp_path / "node0", tmp_path / "node1") if (d / "last.pt").is_file()]
    assert len(written) == 1, "exactly one agent hosts rank 0"
    _assert_same_training(single, written[0])
