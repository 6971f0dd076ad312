"""MLflow on a real PostgreSQL with artifacts on S3 (moto): the nightly flow logs, registers and
promotes there; racing registrations and two flows at once keep every run and one champion."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from mmpipe.layout import Layout
from tests.conftest import REPO, TINY_OVERRIDES, git_env, make_project
from tests.faults.test_concurrency import assert_races_serialised

pytestmark = pytest.mark.slow


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def _s3_keys(s3, prefix: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    return [p.split("/", 1)[1] for p in fs.find(f"{s3.bucket}/{prefix}")]


def _project(tmp_path: Path, name: str, postgres: str, artifacts: str, *extra: str) -> Path:
    overrides = [*TINY_OVERRIDES, f"tracking.uri={postgres}", f"tracking.artifacts={artifacts}"]
    return make_project(tmp_path / name, [*overrides, *extra])


def test_racing_registrations_serialise_on_postgres(tmp_path, postgres):
    """The compare-and-set of the champion alias, on PostgreSQL (pg_advisory_xact_lock)."""
    results = assert_races_serialised(tmp_path, postgres)
    assert {r["lock"] for r in results} == {"pg_advisory_xact_lock"}


def _put_source(s3, shared_data: Path, name: str) -> list[str]:
    """coco-mini uploaded under ``name`` on the store; the params that read it from there."""
    import s3fs

    url = s3.url("sources", name, "coco-mini")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3.endpoint})
    fs.put(str(shared_data / "coco-mini"), url.removeprefix("s3://"), recursive=True)
    coco = ["ingest.source=coco", "ingest.captions=captions.json", "ingest.labels_file=labels.csv"]
    return [*coco, f"ingest.root={url}"]


def test_nightly_flow_with_everything_on_the_store_and_postgres(
    tmp_path, postgres, s3, shared_data
):
    """The whole scale-out set at once: the source on S3 (``ingest.root``), shards published to
    S3 (``shard.output``) and trained/evaluated from there, tracking on PostgreSQL with artifacts
    on S3, then ``dvc push`` to an S3 remote and ``dvc pull`` into a fresh clone."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly import nightly
    from mmpipe import tracking
    from mmpipe.config import load_params

    artifacts = s3.url("mlartifacts", tmp_path.name)
    store = [
        *_put_source(s3, shared_data, tmp_path.name),
        f"shard.output={s3.url('shards', tmp_path.name)}",
    ]
    project = _project(tmp_path, "proj", postgres, artifacts, *store)
    with prefect_test_harness(server_startup_timeout=120):
        out = nightly(project_dir=str(project))
    assert out["version"] == out["champion_version"] == 1 and out["promoted"]
    shard_keys = _s3_keys(s3, f"shards/{tmp_path.name}")
    assert "LATEST" in {k.rsplit("/", 1)[-1] for k in shard_keys}
    assert sum(k.endswith(".tar") for k in shard_keys) == len(
        list((project / "data" / "shards").glob("*.tar"))
    )

    client = _client(postgres)
    exp = client.get_experiment_by_name("mmpipe")
    assert exp.artifact_location == artifacts
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {r.info.run_name for r in runs} >= {"ingest", "curate", "align", "shard", "train"}
    assert all(r.info.artifact_uri.startswith(artifacts + "/") for r in runs)
    keys = _s3_keys(s3, f"mlartifacts/{tmp_path.name}")
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith(".pt") for k in keys), keys
    assert not (project / ".mmpipe" / "mlartifacts").exists()  # nothing fell back to local disk
    # the champion's weights come back from S3 through the registry on PostgreSQL
    params = load_params(project / "params.yaml")
    checkpoint, sidecar = tracking.resolve_model(
        None, params.tracking, params.register, Layout(project)
    )
    assert checkpoint.is_file() and sidecar
    _ui_serves_the_store(params, project, client)
    _dvc_push_then_pull_in_a_fresh_clone(project, s3, tmp_path / "clone")


def _dvc_push_then_pull_in_a_fresh_clone(project: Path, s3, clone: Path) -> None:
    """The flow recorded its outputs in dvc.lock: commit it, push to an S3 remote, and a fresh
    clone pulls every stage output back byte for byte."""
    from tests.integration.test_dvc import _dvc
    from tests.integration.test_dvc_remote import _digest

    def git(cwd: Path, *args: str) -> None:
        subprocess.run(["git", *args], cwd=cwd, env=git_env(), check=True, capture_output=True)

    _dvc(project, "remote", "add", "-d", "store", s3.url("dvc", clone.parent.name))
    git(project, "add", "-A")  # dvc.lock, the remote, metrics and plots (data: .gitignore)
    git(project, "commit", "-qm", "night 1")
    # the endpoint is this machine's: --local keeps it out of the committed .dvc/config
    _dvc(project, "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
    assert "pushed" in _dvc(project, "push")
    git(clone.parent, "clone", "-q", str(project), clone.name)
    _dvc(clone, "remote", "modify", "--local", "store", "endpointurl", s3.endpoint)
    _dvc(clone, "pull")
    for out in ("data", "models"):
        assert _digest(clone / out) == _digest(project / out) != {}, out
    for name in ("metrics.json", "ablation.json"):
        assert (clone / "reports" / name).read_bytes() == (project / "reports" / name).read_bytes()


def _ui_serves_the_store(params, project: Path, client) -> None:
    """`mmpipe ui` on the PostgreSQL store: the champion, and a run's artifact read from S3."""
    from mmpipe import ui
    from tests.servers import free_port

    server = ui.start_ui(ui.create_ui_target(params, project), port=free_port())
    try:
        base = server.base_url
        alias = _get(f"{base}/ajax-api/2.0/mlflow/registered-models/alias"
                     "?name=mmpipe-fusion&alias=champion")  # fmt: skip
        assert alias["model_version"]["version"] == "1"
        run_id = alias["model_version"]["run_id"]
        first = _first_artifact(f"{base}/ajax-api/2.0/mlflow/artifacts/list?run_id={run_id}")
        assert first, f"the UI lists no artifact of run {run_id}"
        with urllib.request.urlopen(f"{base}/get-artifact?path={first}&run_uuid={run_id}") as r:
            assert r.status == 200 and r.read()
    finally:
        server.stop()


def _first_artifact(list_url: str, path: str = "") -> str | None:
    """The first file the server lists for a run, depth first (artifacts are on S3)."""
    for entry in _get(f"{list_url}&path={path}" if path else list_url).get("files", []):
        found = _first_artifact(list_url, entry["path"]) if entry["is_dir"] else entry["path"]
        if found:
            return found
    return None


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _flow(project: Path, prefect_home: Path, s3) -> subprocess.Popen[str]:
    env = git_env() | s3.env | {"PREFECT_HOME": str(prefect_home), "TQDM_DISABLE": "1"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MMPIPE_PARENT_RUN_ID"):
        env.pop(var, None)
    argv = [sys.executable, "-m", "flows.nightly", "--project-dir", str(project)]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_two_flows_at_once_on_one_postgres_keep_every_run_and_one_champion(tmp_path, postgres, s3):
    """Two projects (two teams' nights) log to one tracking DB at the same time."""
    artifacts = s3.url("mlartifacts", tmp_path.name)
    projects = [
        _project(tmp_path, f"p{seed}", postgres, artifacts, f"train.seed={seed}") for seed in (1, 2)
    ]
    flows = [_flow(p, tmp_path / f"prefect{i}", s3) for i, p in enumerate(projects)]
    for proc in flows:
        _, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]

    client = _client(postgres)
    exp = client.get_experiment_by_name("mmpipe")
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2  # one per flow; every stage run nested under its own parent
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {p.info.run_id for p in parents}
    registered = [
        json.loads((p / "reports" / "run.json").read_text())["registered"] for p in projects
    ]
    assert sorted(r["version"] for r in registered) == [1, 2]
    assert {r["lock"] for r in registered} == {"pg_advisory_xact_lock"}
    metric = registered[0]["metric"]
    versions = client.search_model_versions("name='mmpipe-fusion'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = client.get_model_version_by_alias("mmpipe-fusion", "champion")
    assert float(champion.tags[metric]) == max(float(v.tags[metric]) for v in versions)
