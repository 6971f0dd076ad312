"""The nightly Prefect flow end to end on tiny generated data, under prefect_test_harness."""

from __future__ import annotations

import re

import pytest

from flows.nightly import StageFailed, nightly
from tests.conftest import SHARED_DATA, make_project

pytestmark = pytest.mark.slow


def _statuses(out: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in out["summary"]}


def test_second_run_skips_data_stages_and_keeps_the_better_champion(harness, tmp_path):
    import mlflow

    project = make_project(tmp_path / "proj")
    first = nightly(project_dir=str(project))
    assert _statuses(first) == dict.fromkeys(
        ["ingest", "curate", "align", "shard", "train", "evaluate", "register", "report", "dvc"],
        "done",
    )
    assert first["version"] == first["champion_version"] == 1 and first["promoted"]
    # the summary table says what each stage did, at a glance
    detail = {row["stage"]: row["detail"] for row in first["summary"]}
    assert re.fullmatch(r"images (\d+)/\1 accepted, captions (\d+)/\2 accepted", detail["ingest"])
    assert re.fullmatch(r"epochs=1, best val_accuracy=0\.\d{4}", detail["train"]), detail
    assert re.fullmatch(r"accuracy=0\.\d{4}, i2t_r1=0\.\d{4}, t2i_r1=0\.\d{4}", detail["evaluate"])
    assert detail["register"] == "version=1, promoted=True, champion_version=1"

    # a worse model the second night (tiny lr); the data is unchanged. Loader worker processes
    # across two epochs inside a Prefect task: forked workers used to die at each epoch's end.
    second = nightly(
        project_dir=str(project),
        overrides=["train.lr=1e-6", "train.num_workers=1", "train.epochs=2"],
    )
    assert _statuses(second) == {
        "ingest": "skipped",
        "curate": "skipped",
        "align": "skipped",
        "shard": "skipped",
        "train": "done",
        "evaluate": "done",
        "register": "done",
        "report": "done",
        "dvc": "done",
    }
    # train ran with params other than params.yaml's: dvc.lock keeps vouching for the data only
    detail = {row["stage"]: row["detail"] for row in second["summary"]}
    assert detail["dvc"].startswith("dvc.lock records ingest, curate, align, shard; not ")
    assert "not train: params differ from params.yaml in section(s) train" in detail["dvc"]
    assert "not evaluate: its input comes from train, not recorded" in detail["dvc"]
    assert second["version"] == 2

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mmpipe").experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{first['parent_run_id']}'"
    )
    assert sorted(r.info.run_name for r in children) == [
        "align",
        "curate",
        "ingest",
        "shard",
        "train",
    ]
    ingest_run = next(r for r in children if r.info.run_name == "ingest")
    m = ingest_run.data.metrics
    assert m["images.seen"] == m["images.accepted"] + m["images.rejected"] > 0
    train_run = next(r for r in children if r.info.run_name == "train")
    assert "test.accuracy" in train_run.data.metrics  # evaluate logs onto the training run
    # each night's result on its parent run (the runs page's rows): headline metrics + promoted
    for night, promoted in ((first, 1.0), (second, float(second["promoted"]))):
        parent = client.get_run(night["parent_run_id"]).data
        assert parent.tags["mmpipe.kind"] == "flow" and parent.metrics["promoted"] == promoted
        assert {"test.accuracy", "test.i2t_r1", "test.t2i_r1", "test.fusion_gain"} <= set(
            parent.metrics
        )
    assert (
        client.get_run(first["parent_run_id"]).data.metrics["test.accuracy"]
        == (train_run.data.metrics["test.accuracy"])
    )
    versions = client.search_model_versions("name='mmpipe-fusion'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("mmpipe-fusion", "champion")
    acc = {int(v.version): float(v.tags["accuracy"]) for v in versions}
    assert int(champion.version) == max(acc, key=lambda v: (acc[v], -v))
    # a short, rounded tag set, and the model card as each version's description
    v2 = next(v for v in versions if int(v.version) == 2)
    assert len(v2.tags) <= 8 and all(len(v) <= 8 for k, v in v2.tags.items() if k != "data_hash")
    assert v2.description.startswith("### mmpipe-fusion v2: ")
    assert "**Trained on** mmpipe's generated default data" in v2.description
    assert "| metric (test split) | v2 | champion v1 | change |" in v2.description

    # outputs deleted behind the cache's back: that stage re-runs, its upstream stays cached
    import shutil

    shutil.rmtree(project / "data" / "shards")
    third = nightly(project_dir=str(project))
    assert [_statuses(third)[s] for s in ("ingest", "curate", "align", "shard")] == [
        "skipped",
        "skipped",
        "skipped",
        "done",
    ]
    assert (project / "data" / "shards" / "manifest.json").is_file()


def test_failed_stage_stops_the_flow_with_a_summary(harness, tmp_path):
    project = make_project(tmp_path / "proj")
    with pytest.raises(StageFailed) as exc:
        nightly(
            project_dir=str(project),
            overrides=["ingest.source=folder", f"ingest.root={tmp_path / 'nowhere'}"],
        )
    text = str(exc.value)
    assert "ingest" in text and "FAILED" in text and "nowhere" in text
    assert "register   not run" in text
    assert not (project / "models").exists()


def test_after_the_flow_dvc_is_clean_reproduces_it_and_compares_experiments(harness, tmp_path):
    """A fresh clone: the flow records its outputs in dvc.lock, so `dvc status` is clean and
    `dvc repro` a no-op; `dvc repro --force` makes the same bytes (dvc.lock unchanged: data,
    model and reports); an experiment's metrics compare with the commit's as numbers."""
    import json
    import subprocess

    from tests.conftest import git_env

    project = make_project(tmp_path / "proj")

    def run(*cmd: str) -> str:
        proc = subprocess.run(
            cmd, cwd=project, env=git_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{' '.join(cmd)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def ran(output: str) -> set[str]:
        return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running")}

    out = nightly(project_dir=str(project))
    detail = {row["stage"]: row["detail"] for row in out["summary"]}
    assert detail["dvc"] == "dvc.lock records ingest, curate, align, shard, train, evaluate"
    assert json.loads(run("dvc", "status", "--json")) == {}
    assert ran(run("dvc", "repro")) == set()
    # what the user commits: dvc.lock, the metrics and plots (git), nothing else of the outputs
    run("git", "add", "-A")
    committed = set(run("git", "diff", "--cached", "--name-only").split())
    assert {"dvc.lock", "reports/metrics.json", "reports/plots/recall_at_k.json"} <= committed
    assert not {p for p in committed if p.startswith(("data/", "models/", ".mmpipe/"))}
    run("git", "commit", "-qm", "nightly")

    # the other orchestrator, same params: every output the same bytes (dvc.lock's hashes)
    assert ran(run("dvc", "repro", "--force")) == {
        "ingest",
        "curate",
        "align",
        "shard",
        "train",
        "evaluate",
    }
    assert run("git", "status", "--porcelain", "dvc.lock", "reports") == ""

    exp = run("dvc", "exp", "run", "-S", "train.fusion=gated", "--name", "gated")
    assert ran(exp) == {"train", "evaluate"}, exp  # data unchanged: cached
    diff = json.loads(run("dvc", "metrics", "diff", "--json"))["reports/metrics.json"]
    assert isinstance(diff["accuracy"]["old"], float) and isinstance(diff["accuracy"]["new"], float)
    shown = json.loads(run("dvc", "exp", "show", "--json"))
    values = [
        r["data"]["metrics"]["reports/metrics.json"]["data"]["accuracy"]
        for rev in shown
        for r in [rev, *[e["revs"][0] for e in rev.get("experiments") or []]]
    ]
    assert len(values) >= 2 and all(isinstance(v, float) for v in values), values


def test_splits_that_cannot_evaluate_stop_the_flow_right_after_align(harness, tmp_path):
    """An unlabelled collection (judged on retrieval) whose test split has too few images for
    R@K fails before shard and training, in one line that names the split, its counts and the
    params to change. (A labelled run only warns: tests/unit/test_preflight.py.)"""
    from flows.nightly import UserError

    project = make_project(tmp_path / "proj")
    unlabelled = [
        "ingest.source=coco", f"ingest.root={SHARED_DATA / 'coco-mini'}",
        "ingest.captions=captions.json", "ingest.labels_file=null",
    ]  # fmt: skip
    with pytest.raises(UserError) as exc:
        nightly(
            project_dir=str(project),
            overrides=[*unlabelled, "align.train=0.98", "align.val=0.01", "align.test=0.01"],
        )
    line = exc.value.line
    assert line.startswith("python -m flows.nightly: error: the test split has ")
    assert "align.test=0.01" in line and "\n" not in line
    table = str(exc.value)
    assert re.search(r"^check +FAILED +the test split has", table, re.M), table
    assert re.search(r"^shard +not run", table, re.M) and re.search(r"^train +not run", table, re.M)
    assert not (project / "data" / "shards").exists() and not (project / "models").exists()


def test_a_user_error_under_the_flow_is_one_line_and_the_table_once(tmp_path):
    """`python -m flows.nightly` with a missing data root: exit 2, the line `mmpipe ingest`
    prints for it, the summary table once, no traceback."""
    import subprocess
    import sys

    from tests.conftest import git_env

    project = make_project(tmp_path / "proj")
    env = {**git_env(), "PREFECT_HOME": str(tmp_path / "prefect")}
    root = tmp_path / "nowhere"
    cmd = ["-m", "flows.nightly", "--project-dir", str(project), "--set", "ingest.source=folder"]
    proc = subprocess.run(
        [sys.executable, *cmd, "--set", f"ingest.root={root}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    line = f"mmpipe ingest: error: data root not found or not a directory: {root} (ingest.root)"
    assert out.splitlines().count(line) == 1, out
    assert out.count("stage      status") == 1, out
    assert "Traceback" not in out, out
