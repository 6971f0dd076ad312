"""2-process gloo DDP under torchrun == one process with the same global batch.

Full-batch steps (global batch = the whole train split) make the comparison independent of how
mmpipe.data splits samples between ranks: both runs see exactly the same samples per step. The
contrastive loss is computed over the gathered global batch and the task loss is normalised by
the global labelled count, so the only differences left are float summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpipe.train import run_train
from tests.conftest import tiny_train_params, write_mood_shards

REPO = Path(__file__).resolve().parents[2]

WORKER = """
import json, sys
from pathlib import Path
from mmpipe.config import TrainParams
from mmpipe.train import run_train
p = TrainParams.model_validate(json.loads(sys.argv[1]))
run_train(Path(sys.argv[2]), p, Path(sys.argv[3]))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_two_processes_match_single_process(tmp_path):
    shards = write_mood_shards(tmp_path / "shards", {"train": 16, "val": 4}, per_shard=16)
    # 32 train samples in 2 shards; batch 32 = one full-batch step per epoch, 16 per rank
    p = tiny_train_params(epochs=3, batch_size=32, dropout=0.0, shuffle_buffer=0, lr=1e-3)
    single = run_train(shards, p, tmp_path / "single")

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        str(script),
        p.model_dump_json(),
        str(shards),
        str(tmp_path / "ddp"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((tmp_path / "ddp" / "train_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == single["steps"] == 3
    a = torch.load(tmp_path / "single" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]
    for k in a:
        # 1e-4: attention key biases get a mathematically-zero gradient whose float noise Adam
        # normalises into steps of up to lr; they differ by ~3e-5 after 3 steps, all else ~1e-7
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
    hist = single["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # it trained: the match is not vacuous
    for key in ("train_loss", "train_contrastive", "train_task"):
        assert report["history"][-1][key] == pytest.approx(single["history"][-1][key], rel=1e-4)
