"""`dvc repro` in a fresh git+dvc project: runs, is a no-op the second time, re-runs only what a
changed param touches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_OVERRIDES, git_env, make_project

pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str) -> str:
    proc = subprocess.run(
        ["dvc", *args], cwd=project, env=git_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_repro_noop_and_partial_rerun(tmp_path):
    project = make_project(tmp_path / "proj")
    first = _dvc(project, "repro", "shard")
    assert _ran(first) == {"ingest", "curate", "align", "shard"}
    manifest = json.loads((project / "data/shards/manifest.json").read_text())
    align = json.loads((project / "data/align/report.json").read_text())
    assert {s: v["pairs"] for s, v in manifest["splits"].items()} == align["pairs_per_split"]

    second = _dvc(project, "repro", "shard")
    assert _ran(second) == set(), second

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["shard"]["jpeg_quality"] = 70
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _dvc(project, "repro", "shard")
    assert _ran(third) == {"shard"}, third
    assert (
        json.loads((project / "data/shards/manifest.json").read_text())["params_hash"]
        != manifest["params_hash"]
    )


def test_exp_run_with_a_param_override(tmp_path):
    """`dvc exp run -S train.fusion=gated` re-runs only train and evaluate (data cached) and
    `dvc exp show` lists the experiment with its metrics."""
    project = make_project(tmp_path / "proj")
    _dvc(project, "repro")  # the baseline on the commit
    out = _dvc(project, "exp", "run", "-S", "train.fusion=gated", "--name", "gated")
    assert {"train", "evaluate"} <= _ran(out), out
    assert not {"ingest", "curate", "align", "shard"} & _ran(out), out  # data unchanged: cached
    shown = json.loads(_dvc(project, "exp", "show", "--json"))
    text = json.dumps(shown)
    assert '"gated"' in text and "accuracy" in text
    report = json.loads((project / "models" / "train_report.json").read_text())
    assert report["model"]["fusion"] == "gated"


def test_repro_of_a_grown_collection_is_incremental(tmp_path):
    """10 % more synthetic images: `dvc repro shard` keeps the unchanged shards (data/shards is
    `persist: true`, so DVC leaves it for the run) and ends with the from-scratch samples."""
    from mmpipe.io import read_json
    from tests.unit.test_incremental import samples

    overrides = [o for o in TINY_OVERRIDES if not o.startswith("shard.maxcount")]
    project = make_project(tmp_path / "proj", [*overrides, "shard.maxcount=8"])
    _dvc(project, "repro", "shard")
    before = read_json(project / "data/shards/manifest.json")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["ingest"]["synthetic"]["n_images"] = 53
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(project, "repro", "shard")
    assert _ran(out) == {"ingest", "curate", "align", "shard"}, out
    assert " shards reused" in out and ", 0 shards reused" not in out, out
    scratch = make_project(tmp_path / "scratch", [*overrides, "shard.maxcount=8"])
    scratch_params = yaml.safe_load((scratch / "params.yaml").read_text())
    scratch_params["ingest"]["synthetic"]["n_images"] = 53
    (scratch / "params.yaml").write_text(yaml.safe_dump(scratch_params, sort_keys=False))
    _dvc(scratch, "repro", "shard")
    assert samples(project / "data/shards") == samples(scratch / "data/shards")
    kept = {s["name"] for e in before["splits"].values() for s in e["shards"]}
    assert kept & {p.name for p in (project / "data/shards").glob("*.tar")}


def _versioned(project: Path) -> dict[str, str]:
    """sha256 of every file of the outputs dvc.yaml declares (data, model, reports)."""
    import hashlib

    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    outs = [
        next(iter(o)) if isinstance(o, dict) else o
        for s in stages.values()
        for o in s.get("outs", []) + s.get("metrics", [])
    ]
    files = {}
    for out in map(project.joinpath, outs):
        for f in sorted(out.rglob("*")) if out.is_dir() else [out]:
            if f.is_file():
                files[str(f.relative_to(project))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return files


def test_restore_an_experiment_and_a_past_night(tmp_path):
    """docs/restore.md "Restore a past night / an experiment", step by step: an experiment applied to the
    workspace, then back to HEAD, then a past commit; each restore brings back every versioned
    output of that night (the report's inputs included) and deletes nothing."""
    project = make_project(tmp_path / "proj")
    _dvc(project, "repro")
    env = git_env()

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"git {' '.join(args)}:\n{proc.stderr}"
        return proc.stdout

    git("add", "-A")
    git("commit", "-qm", "night 1")
    night1 = _versioned(project)
    assert {"reports/evaluation_report.json", "reports/examples/examples.json"} <= set(night1)
    # the run record differs on every run: not an output; mmpipe restore rewrites it
    assert not {"reports/run.json", "reports/report.md", "reports/report.html"} & set(night1)

    def restore() -> None:  # the DVC half of the README's restore
        proc = subprocess.run(
            [sys.executable, "-m", "mmpipe", "restore"], cwd=project, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr

    _dvc(project, "exp", "run", "-S", "train.fusion=gated", "--name", "gated")
    _dvc(project, "exp", "apply", "gated")
    experiment = _versioned(project)
    changed = {f for f in night1 if experiment.get(f) != night1[f]}
    assert {"reports/metrics.json", "reports/evaluation_report.json"} <= changed, changed
    assert "fusion=gated" in (project / "reports/report.md").read_text()

    # back to HEAD (docs/restore.md): the workspace is night 1 again, whole, and both tools say clean
    git("checkout", "--", "params.yaml", "dvc.lock", "reports/")
    restore()
    assert _versioned(project) == night1
    # the report and run record now describe the restored night, not the experiment
    report = (project / "reports/report.md").read_text()
    assert "fusion=concat" in report and "fusion=gated" not in report
    assert json.loads((project / "reports/run.json").read_text())["origin"] == "mmpipe restore"
    assert json.loads(_dvc(project, "status", "--json")) == {}
    assert git("status", "--porcelain") == ""

    # the experiment kept as night 2, then night 1 restored from its commit
    _dvc(project, "exp", "apply", "gated")
    git("add", "-A")
    git("commit", "-qm", "night 2")
    git("checkout", "-q", "HEAD~1")
    restore()
    assert _versioned(project) == night1
    run = json.loads((project / "reports/run.json").read_text())
    assert run["params"]["train"]["fusion"] == "concat"
    assert json.loads(_dvc(project, "status", "--json")) == {}
