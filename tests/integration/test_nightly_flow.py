"""The nightly Prefect flow end to end on tiny generated data, under prefect_test_harness."""

from __future__ import annotations

import re

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.nightly import StageFailed, nightly
from tests.conftest import make_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _statuses(out: dict) -> dict[str, str]:
    return {row["stage"]: row["status"] for row in out["summary"]}


def test_second_run_skips_data_stages_and_keeps_the_better_champion(harness, tmp_path):
    import mlflow

    project = make_project(tmp_path / "proj")
    first = nightly(project_dir=str(project))
    assert _statuses(first) == dict.fromkeys(
        ["ingest", "align", "shard", "train", "evaluate", "register"], "done"
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
        "align": "skipped",
        "shard": "skipped",
        "train": "done",
        "evaluate": "done",
        "register": "done",
    }
    assert second["version"] == 2

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("mmpipe").experiment_id
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{first['parent_run_id']}'"
    )
    assert sorted(r.info.run_name for r in children) == ["align", "ingest", "shard", "train"]
    ingest_run = next(r for r in children if r.info.run_name == "ingest")
    m = ingest_run.data.metrics
    assert m["images.seen"] == m["images.accepted"] + m["images.rejected"] > 0
    train_run = next(r for r in children if r.info.run_name == "train")
    assert "test.accuracy" in train_run.data.metrics  # evaluate logs onto the training run
    versions = client.search_model_versions("name='mmpipe-fusion'")
    assert len(versions) == 2
    champion = client.get_model_version_by_alias("mmpipe-fusion", "champion")
    acc = {int(v.version): float(v.tags["accuracy"]) for v in versions}
    assert int(champion.version) == max(acc, key=lambda v: (acc[v], -v))

    # outputs deleted behind the cache's back: that stage re-runs, its upstream stays cached
    import shutil

    shutil.rmtree(project / "data" / "shards")
    third = nightly(project_dir=str(project))
    assert [_statuses(third)[s] for s in ("ingest", "align", "shard")] == [
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


def test_dvc_repro_and_the_flow_make_the_same_artifacts(harness, tmp_path):
    """Same params, two orchestrators: byte-identical shards and identical metrics."""
    import json
    import shutil
    import subprocess

    from tests.conftest import git_env

    project = make_project(tmp_path / "proj")

    def dvc(*args: str) -> str:
        proc = subprocess.run(
            ["dvc", *args], cwd=project, env=git_env(), capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    dvc("repro")
    shown = json.loads(dvc("metrics", "show", "--json"))
    assert "accuracy" in json.dumps(shown)  # DVC reads reports/metrics.json
    dvc("plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    manifest = (project / "data/shards/manifest.json").read_bytes()
    metrics = json.loads((project / "reports/metrics.json").read_text())

    for out in ("data", "models", "reports"):
        shutil.rmtree(project / out)
    nightly(project_dir=str(project))
    assert (project / "data/shards/manifest.json").read_bytes() == manifest  # sha256 of every shard
    again = json.loads((project / "reports/metrics.json").read_text())
    for scored in (again, metrics):  # a checkpoint also records its epochs' timings: other bytes
        scored.pop("checkpoint_sha256")
    assert again == metrics
