"""kill -9 at each write boundary of each stage: the previous output or the new one, never a mix;
the next run removes what the killed one left and makes exactly the output a clean run makes.

Each case runs `mmpipe <stage>` with changed params (so old and new differ) and a kill point,
then reruns it cleanly, and compares with a clean run of the same params on a fresh copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import KILLED, client, leftovers, mmpipe, snapshot, weights

CHANGES = {
    "ingest": ["--set", "ingest.synthetic.seed=1"],  # other images, other captions
    "align": ["--set", "align.seed=1"],  # another split
    "shard": ["--set", "shard.jpeg_quality=70"],  # other bytes in every shard
    "train": ["--set", "train.seed=1"],  # other weights
    "evaluate": ["--set", "evaluate.ks=[1,3]"],  # other metrics
}
OUT = {
    "ingest": "data/ingest",
    "align": "data/align",
    "shard": "data/shards",
    "train": "models",
    "evaluate": "reports",
}
CASES = [
    ("ingest", "ingest:source-ready"),  # the synthetic source regenerated, no table yet
    ("ingest", "ingest:images-written"),  # images.parquet new, records.parquet not yet
    ("ingest", "ingest:records-written"),  # both tables new, report.json not yet
    ("ingest", "ingest:staged"),  # everything written and stamped, not switched in
    ("ingest", "commit:after-switch"),  # switched in, the old version not yet deleted
    ("align", "align:pairs-written"),
    ("align", "commit:before-switch"),
    ("shard", "shard:shard-written:1"),  # the first shard closed
    ("shard", "shard:shard-written:3"),  # the third, mid-split
    ("shard", "shard:staged"),  # manifest and stamp written
    ("shard", "commit:before-switch"),
    ("shard", "commit:after-switch"),
    ("train", "train:step:2"),  # mid-epoch, no checkpoint yet
    ("train", "train:checkpoint-saved"),  # the epoch's checkpoint in models.partial/
    ("train", "commit:before-switch"),  # the finished model staged, not switched in
    ("train", "commit:after-switch"),
    ("train", "train:installed"),  # models/ new, models.partial/ not yet removed
    ("evaluate", "evaluate:staged"),
    ("evaluate", "commit:after-switch"),
]


def view(stage: str, project: Path) -> Any:
    """What must be old or new after a kill. Byte snapshots where outputs are deterministic;
    train's and evaluate's reports carry timings, so their weights and metrics instead."""
    out = project / OUT[stage]
    if stage == "train":
        if not out.exists():
            return None
        names = sorted(p.name for p in out.iterdir())
        return names, weights(out / "best.pt"), weights(out / "last.pt")
    if stage == "evaluate":
        names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        return names, json.loads((out / "metrics.json").read_text())
    return snapshot(out)


@pytest.fixture(scope="module")
def clean(built, tmp_path_factory):
    """The output of a clean run of each stage with the changed params (computed once)."""
    cache: dict[str, Any] = {}

    def get(stage: str) -> Any:
        if stage not in cache:
            copy = tmp_path_factory.mktemp(f"clean-{stage}") / "project"
            shutil.copytree(built, copy, symlinks=True)
            proc = mmpipe(copy, stage, *CHANGES[stage])
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[stage] = view(stage, copy)
        return cache[stage]

    return get


@pytest.mark.parametrize(("stage", "point"), CASES, ids=[f"{s}-{p}" for s, p in CASES])
def test_kill9_leaves_old_or_new_and_the_rerun_is_clean(project, clean, stage, point):
    old = view(stage, project)
    killed = mmpipe(project, stage, *CHANGES[stage], fault=point)
    assert killed.returncode == KILLED, killed.stderr[-3000:]
    after_kill = view(stage, project)
    new = clean(stage)
    assert old != new  # the case can tell them apart
    assert after_kill in (old, new), f"a mix after a kill at {point}"

    rerun = mmpipe(project, stage, *CHANGES[stage])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert view(stage, project) == new  # the same output as a run that was never killed
    assert leftovers(project) == []
    assert not (project / "models.partial").exists()


def test_kill9_mid_training_then_resume_is_exact(project, clean):
    """Two epochs, killed in the second (after the first's checkpoint): --resume continues from
    that checkpoint and ends with the weights of an uninterrupted run."""
    args = ["train", "--set", "train.epochs=2", "--set", "train.seed=1"]
    killed = mmpipe(project, *args, fault="train:step:5")  # 3 steps an epoch: an image a row
    assert killed.returncode == KILLED
    assert (project / "models.partial" / "last.pt").is_file()
    resumed = mmpipe(project, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at epoch 1" in resumed.stderr
    straight = project.parent / "straight"
    shutil.copytree(project, straight, symlinks=True)
    shutil.rmtree(straight / "models")
    assert mmpipe(straight, *args).returncode == 0
    assert weights(project / "models" / "last.pt") == weights(straight / "models" / "last.pt")


def _runs(project: Path) -> dict[str, str]:
    mlflow = client(project)
    exp = mlflow.get_experiment_by_name("mmpipe").experiment_id
    return {r.info.run_id: r.info.status for r in mlflow.search_runs([exp], max_results=500)}


def test_runs_of_killed_processes_are_ended_killed_by_the_next_run(project):
    before = _runs(project)
    assert mmpipe(project, "train", fault="train:step:2").returncode == KILLED
    orphan = [r for r, status in _runs(project).items() if r not in before]
    assert [_runs(project)[r] for r in orphan] == ["RUNNING"]  # what kill -9 leaves
    assert mmpipe(project, "register").returncode == 0  # a later run that opens the store...
    assert _runs(project)[orphan[0]] == "KILLED"  # ...ends it


@pytest.mark.parametrize("point", ["register:version-created", "register:alias-decided"])
def test_kill9_in_register_leaves_the_champion_or_the_new_one(project, point):
    registry = client(project)
    champion = registry.get_model_version_by_alias("mmpipe-fusion", "champion").version
    assert mmpipe(project, "register", fault=point).returncode == KILLED
    # the same model again: a tie, so the alias must stay (a kill must not move it either)
    assert registry.get_model_version_by_alias("mmpipe-fusion", "champion").version == champion
    rerun = mmpipe(project, "register")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout)
    assert (result["promoted"], result["champion_version"]) == (False, int(champion))
