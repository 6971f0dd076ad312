"""Damaged inputs and stale state: corrupted shards, a checkpoint of other params or data,
metrics of another model, a champion scored on another split, a full disk. Each is refused with
one line naming the file and the reason (exit 2), and changes nothing; or, for the champion,
compared like for like."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.faults.conftest import (
    KILLED,
    leftovers,
    mmpipe,
    one_line,
    snapshot,
    weights,
)


def _shard(project: Path) -> Path:
    manifest = json.loads((project / "data" / "shards" / "manifest.json").read_text())
    return project / "data" / "shards" / manifest["splits"]["train"]["shards"][0]["name"]


def _refused(proc: subprocess.CompletedProcess[str], prog: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line(proc.stderr)
    assert line.startswith(f"{prog}: error: ")
    return line


def test_a_truncated_shard_is_refused_naming_it(project):
    shard, models = _shard(project), snapshot(project / "models")
    shard.write_bytes(shard.read_bytes()[:-700])
    line = _refused(mmpipe(project, "train"), "mmpipe train")
    assert str(shard) in line and "manifest.json's train entry" in line and "bytes" in line
    assert snapshot(project / "models") == models


def test_flipped_bytes_in_a_shard_are_refused_naming_it(project):
    shard, models = _shard(project), snapshot(project / "models")
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 32] = bytes(b ^ 0xFF for b in data[middle : middle + 32])
    shard.write_bytes(bytes(data))  # same size: only the sha256 can tell
    line = _refused(mmpipe(project, "train"), "mmpipe train")
    assert str(shard) in line and "sha256" in line and "corrupted or modified" in line
    assert snapshot(project / "models") == models


def test_resume_refuses_a_checkpoint_of_other_params_or_data(project):
    killed = mmpipe(project, "train", "--set", "train.seed=1", fault="train:checkpoint-saved")
    assert killed.returncode == KILLED
    partial = snapshot(project / "models.partial")
    line = _refused(mmpipe(project, "train", "--resume", "--set", "train.seed=2"), "mmpipe train")
    assert "train.seed: 1 -> 2" in line and "refuses to continue it" in line
    assert mmpipe(project, "shard", "--set", "shard.jpeg_quality=70").returncode == 0
    line = _refused(mmpipe(project, "train", "--resume", "--set", "train.seed=1"), "mmpipe train")
    assert "the shard manifest differs" in line
    assert snapshot(project / "models.partial") == partial  # refused: nothing discarded


def test_resume_never_reports_yesterdays_model(project):
    """No interrupted run: --resume trains from scratch, it does not pass off models/ as new."""
    old = weights(project / "models" / "last.pt")
    proc = mmpipe(project, "train", "--resume", "--set", "train.seed=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to resume, starting from scratch" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["epochs_completed"] == 1 and not report["interrupted"]
    assert weights(project / "models" / "last.pt") != old


def test_register_refuses_metrics_of_another_checkpoint(project):
    """train without evaluate: reports/metrics.json scored the previous model."""
    from tests.faults.conftest import client

    versions = len(client(project).search_model_versions("name='mmpipe-fusion'"))
    assert mmpipe(project, "train", "--set", "train.seed=1").returncode == 0
    line = _refused(mmpipe(project, "register"), "mmpipe register")
    assert "metrics.json" in line and "run `mmpipe evaluate` before `mmpipe register`" in line
    assert len(client(project).search_model_versions("name='mmpipe-fusion'")) == versions


def test_a_champion_of_another_split_is_rescored_on_this_one(project):
    """A new split (align.seed): the champion is scored on the new test split and the two are
    compared like for like; both numbers are recorded."""
    from mmpipe.config import load_params
    from mmpipe.layout import Layout
    from mmpipe.pipeline import score_on_test_split
    from tests.faults.conftest import client

    champion_checkpoint = project.parent / "champion.pt"
    shutil.copy(project / "models" / "best.pt", champion_checkpoint)
    proc = mmpipe(project, "run", "--set", "align.seed=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)["register"]
    assert result["compared_on"] == "rescored" and result["previous_champion_version"] == 1
    params = load_params(project / "params.yaml", ["align.seed=1"])
    here = score_on_test_split(params, Layout(project), champion_checkpoint)
    assert result["previous_champion_value"] == pytest.approx(here[result["metric"]])
    tags = client(project).get_model_version("mmpipe-fusion", str(result["version"])).tags
    assert tags["compared_on"] == "rescored"
    assert float(tags[f"compared_with_{result['metric']}"]) == result["previous_champion_value"]


# ----------------------------------------------------------------------------- a full disk


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _fill(disk: Path, leave: int) -> None:
    """Fill ``disk`` until only ``leave`` bytes are free."""
    st = os.statvfs(disk)
    free = st.f_bavail * st.f_frsize
    with (disk / "filler").open("wb") as fh:
        fh.truncate(0)
        for _ in range(max(0, free - leave) // (1 << 16)):
            fh.write(bytes(1 << 16))


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size at tmp_path/disk; unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        if shutil.which("mount") is None:
            pytest.skip("no mount(8) here")
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr}")
        mounted.append(disk)
        return disk

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize(
    ("stage", "out", "args"),
    [
        ("ingest", "data/ingest", ["--set", "ingest.synthetic.seed=1"]),
        ("shard", "data/shards", ["--set", "shard.jpeg_quality=70"]),
        ("train", "models", ["--set", "train.seed=1"]),
    ],
)
def test_a_full_disk_is_one_line_exit_2_and_keeps_the_old_output(
    project, small_disk, stage, out, args
):
    disk = small_disk(2 * _size(project) + (16 << 20))
    copy = disk / "project"
    shutil.copytree(project, copy, symlinks=True)
    _fill(disk, leave=_size(project / out) // 2)  # room for half the new output: full mid-write
    before = snapshot(copy / out)
    proc = mmpipe(copy, stage, *args)
    line = _refused(proc, f"mmpipe {stage}")
    assert "no space left on device" in line and "Free space and run" in line
    assert snapshot(copy / out) == before
    assert leftovers(copy) == []
