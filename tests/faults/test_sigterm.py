"""SIGTERM in every entry point: training checkpoints, the command exits 143 (128 + SIGTERM),
nothing after train runs, nothing is registered, the MLflow runs end KILLED.

The signal comes from ``mmpipe.faults`` (``MMPIPE_FAULT_SIGNAL=SIGTERM``): the process signals
itself at a named moment, which is what an outside ``kill -TERM`` at that moment does, minus
the timing lottery. One test sends a real SIGTERM from outside.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.conftest import (
    TERMINATED,
    client,
    env,
    leftovers,
    mmpipe,
    one_line,
    snapshot,
    weights,
)

MODEL = "mmpipe-fusion"


def _versions(project: Path) -> list[str]:
    return sorted(v.version for v in client(project).search_model_versions(f"name='{MODEL}'"))


def _statuses(project: Path) -> dict[str, tuple[str, str]]:
    """run id -> (run name, status)."""
    mlflow = client(project)
    exp = mlflow.get_experiment_by_name("mmpipe").experiment_id
    runs = mlflow.search_runs([exp], max_results=500)
    return {r.info.run_id: (r.info.run_name, r.info.status) for r in runs}


def _state(project: Path) -> tuple:
    """What an interrupted run must not change: the model, the reports, the registry."""
    return (
        weights(project / "models" / "best.pt"),
        snapshot(project / "reports"),
        _versions(project),
        client(project).get_model_version_by_alias(MODEL, "champion").version,
    )


def _assert_stopped(project: Path, proc: subprocess.CompletedProcess[str], before: tuple) -> None:
    assert proc.returncode == TERMINATED, proc.stderr[-3000:]
    assert "SIGTERM" in proc.stderr
    assert (project / "models.partial" / "last.pt").is_file()  # the checkpoint --resume needs
    assert _state(project) == before  # no model installed, nothing evaluated or registered


@pytest.mark.parametrize(
    ("stage", "point", "args"),
    [
        ("shard", "shard:shard-written:2", ["--set", "shard.jpeg_quality=70"]),
        ("evaluate", "evaluate:staged", ["--set", "evaluate.ks=[1,3]"]),
    ],
)
def test_sigterm_in_a_staged_stage_keeps_the_old_output(project, stage, point, args):
    out = project / {"shard": "data/shards", "evaluate": "reports"}[stage]
    before = snapshot(out)
    proc = mmpipe(project, stage, *args, fault=point, signal_name="SIGTERM")
    assert proc.returncode == TERMINATED, proc.stderr[-3000:]
    assert one_line(proc.stderr) == f"mmpipe {stage}: interrupted by SIGTERM"
    assert snapshot(out) == before
    assert leftovers(project) == []  # the staging directory went with the error


def test_sigterm_mid_epoch_in_mmpipe_train(project):
    before, runs = _state(project), _statuses(project)
    proc = mmpipe(project, "train", "--set", "train.seed=1", fault="train:step:2",
                  signal_name="SIGTERM")  # fmt: skip
    _assert_stopped(project, proc, before)
    line = one_line(proc.stderr)
    assert line.startswith("mmpipe train: train stopped by SIGTERM") and "--resume" in line
    new = [s for r, s in _statuses(project).items() if r not in runs]
    assert new == [("train", "KILLED")]


def test_sigterm_right_after_the_first_checkpoint(project):
    """The moment a SIGTERM once gave exit -15 (default handler) or 0 (checkpointed, exit 0)."""
    before = _state(project)
    args = ["train", "--set", "train.seed=1", "--set", "train.epochs=2"]
    proc = mmpipe(project, *args, fault="train:checkpoint-saved", signal_name="SIGTERM")
    _assert_stopped(project, proc, before)
    resumed = mmpipe(project, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout)["epochs_completed"] == 2


def test_a_real_sigterm_from_outside(project):
    """kill -TERM of a running `mmpipe train` at an arbitrary moment: 143 and models unchanged,
    whether it landed before, during or after the first checkpoint."""
    before = _state(project)
    args = ["train", "--set", "train.seed=1", "--set", "train.epochs=50"]
    cmd = [sys.executable, "-m", "mmpipe", *args, "--project-dir", str(project)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env())  # fmt: skip
    deadline = time.monotonic() + 300
    while not (project / "models.partial" / "last.pt").exists():  # one epoch done
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(cmd, proc.returncode, "", stderr)
    _assert_stopped(project, done, before)


def test_sigterm_in_mmpipe_run_stops_before_evaluate(project):
    before = _state(project)
    proc = mmpipe(project, "run", "--set", "train.seed=1", fault="train:step:2",
                  signal_name="SIGTERM")  # fmt: skip
    _assert_stopped(project, proc, before)
    assert one_line(proc.stderr).startswith("mmpipe run: train stopped by SIGTERM")


def test_sigterm_in_the_nightly_flow_registers_nothing(project):
    before, runs = _state(project), _statuses(project)
    cmd = [sys.executable, "-m", "flows.nightly", "--project-dir", str(project),
           "--set", "train.seed=1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=env("train:step:2", "SIGTERM"))  # fmt: skip
    _assert_stopped(project, proc, before)
    assert "nothing was promoted" in proc.stderr
    for stage in ("evaluate", "register"):
        assert any(line.split()[:2] == [stage, "not"] for line in proc.stderr.splitlines())
    added = dict(s for r, s in _statuses(project).items() if r not in runs)
    killed = sorted(name for name, status in added.items() if status == "KILLED")
    assert len(killed) == 2 and "train" in killed  # the flow's parent run and train's run
    assert not {"evaluate", "register"} & set(added)  # no run of a stage after train
