"""MLflow tracking + registry against a throwaway sqlite store per test."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from mmpipe import tracking
from mmpipe.config import Params, RegisterParams, TrackingParams
from mmpipe.errors import InputError


@pytest.fixture
def store(tmp_path, monkeypatch) -> TrackingParams:
    """A fresh sqlite tracking store in tmp_path; no env override, no parent leaking in."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    yield TrackingParams(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_default_uri_is_absolute_sqlite_under_project(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri(None, Path("proj"))
    assert uri == f"sqlite:///{tmp_path / 'proj' / '.mmpipe' / 'mlflow.db'}"
    assert (
        tracking.artifact_location(uri) == (tmp_path / "proj" / ".mmpipe" / "mlartifacts").as_uri()
    )
    assert tracking.tracking_uri(TrackingParams(uri="http://h:5000"), tmp_path) == "http://h:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert (
        tracking.tracking_uri(TrackingParams(uri="http://h:5000"), tmp_path) == "sqlite:////x/y.db"
    )
    assert tracking.artifact_location("http://h:5000") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    rel = tracking.tracking_uri(TrackingParams(uri="sqlite:///db/m.db"), tmp_path)
    assert rel == f"sqlite:///{tmp_path / 'db' / 'm.db'}"


def test_log_evaluation_prefixes_metrics_and_uploads_reports(store, tmp_path):
    (tmp_path / "reports" / "plots").mkdir(parents=True)
    (tmp_path / "reports" / "metrics.json").write_text("{}")
    (tmp_path / "reports" / "plots" / "recall_at_k.json").write_text("[]")
    with tracking.start_run(store, tmp_path, run_name="train") as run:
        pass
    metrics = {"accuracy": 0.75, "i2t_r1": 0.5, "nan": float("nan")}
    tracking.log_evaluation(store, tmp_path, run.id, metrics, tmp_path / "reports")
    client = run.client
    assert client.get_run(run.id).data.metrics == {"test.accuracy": 0.75, "test.i2t_r1": 0.5}
    paths = {a.path for a in client.list_artifacts(run.id, "evaluation")}
    assert paths == {"evaluation/metrics.json", "evaluation/plots"}


def test_run_logs_params_metrics_artifacts(store, tmp_path):
    (tmp_path / "plot.json").write_text("[]")
    with tracking.start_run(store, tmp_path, run_name="train") as handle:
        flat = tracking.log_params(handle, Params(), {"data.manifest_sha256": "abc123"})
        on_epoch = tracking.epoch_logger(handle)
        on_epoch(0, {"loss": 2.0, "val": {"accuracy": 0.25}, "note": "text is skipped"})
        on_epoch(1, {"loss": 1.0, "val": {"accuracy": 0.5}, "flag": True})
        tracking.log_artifacts(handle, tmp_path / "plot.json", "plots")
    run_id, client = handle.id, handle.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.002"
    assert run.data.params["data.manifest_sha256"] == "abc123"
    assert run.data.params["git.commit"] == flat["git.commit"] != ""
    assert run.data.params["ingest.root"] == "null"
    assert run.data.metrics == {"loss": 1.0, "val.accuracy": 0.5}
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 2.0), (1, 1.0)]
    names = [a.path for a in client.list_artifacts(run_id, "plots")]
    assert names == ["plots/plot.json"]
    # artifacts land beside the DB, not in the working directory
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())


def test_epoch_logger_is_one_batched_call(store, tmp_path, monkeypatch):
    calls = []
    with tracking.start_run(store, tmp_path, run_name="train") as run:
        on_epoch = tracking.epoch_logger(run)
        real = MlflowClient.log_batch

        def spy(self, run_id, metrics=(), **kw):
            calls.append(len(metrics))
            return real(self, run_id, metrics=metrics, **kw)

        monkeypatch.setattr(MlflowClient, "log_batch", spy)
        on_epoch(3, {f"m{i}": float(i) for i in range(7)})
    assert calls == [7]


def test_failed_run_is_marked_failed(store, tmp_path):
    with pytest.raises(ValueError), tracking.start_run(store, tmp_path, run_name="x") as run:
        raise ValueError("boom")
    assert run.client.get_run(run.id).info.status == "FAILED"


def test_parent_run_by_id_and_by_env(store, tmp_path, monkeypatch):
    params = Params()  # a non-default value: the parent logs the params it was given
    params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 5})})
    parent = tracking.open_parent_run(store, tmp_path, params)
    with tracking.start_run(store, tmp_path, run_name="train", parent_run_id=parent) as child:
        pass
    monkeypatch.setenv(tracking.PARENT_ENV, parent)  # what a subprocess stage would inherit
    with tracking.start_run(store, tmp_path, run_name="evaluate") as child2:
        pass
    tracking.close_parent_run(store, tmp_path, parent, "FAILED", "stage  status\ntrain  done")
    client = child.client
    for run in (child, child2):
        assert client.get_run(run.id).data.tags["mlflow.parentRunId"] == parent
    run = client.get_run(parent)
    assert run.info.status == "FAILED" and run.data.params["train.epochs"] == "5"
    assert [a.path for a in client.list_artifacts(parent)] == ["summary.txt"]


def test_in_process_nesting_and_env_export(store, tmp_path):
    with tracking.start_run(store, tmp_path, run_name="nightly", export_parent=True) as parent:
        import os

        assert os.environ[tracking.PARENT_ENV] == parent.id
        with tracking.start_run(store, tmp_path, run_name="train") as child:
            pass
    assert tracking.PARENT_ENV not in __import__("os").environ
    assert child.client.get_run(child.id).data.tags["mlflow.parentRunId"] == parent.id


def test_connect_creates_db_once_and_is_idempotent(store, tmp_path):
    from mmpipe.tracking import store as store_module

    first = tracking.connect(store, tmp_path)
    store_module._initialised.clear()  # as a second process would see it
    second = tracking.connect(store, tmp_path)
    assert first.experiment_id == second.experiment_id and first.uri == second.uri
    assert (tmp_path / "mlflow.db").is_file()
    assert second.client.get_experiment(first.experiment_id).name == "mmpipe"


def test_every_call_goes_to_the_store_it_was_given(tmp_path, monkeypatch):
    """Two stores in one process: a run handle keeps logging to its own store, whichever store
    was connected last (no reliance on MLflow's global tracking URI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a = TrackingParams(uri=f"sqlite:///{tmp_path / 'a.db'}")
    b = TrackingParams(uri=f"sqlite:///{tmp_path / 'b.db'}")
    with tracking.start_run(a, tmp_path, run_name="in-a") as run_a:
        tracking.connect(b, tmp_path)  # the global URI now points at b
        tracking.log_metrics(run_a, {"x": 1.0})
        tracking.log_params(run_a, TrackingParams())
    client_a, client_b = tracking.connect(a, tmp_path).client, tracking.connect(b, tmp_path).client
    assert client_a.get_run(run_a.id).data.metrics == {"x": 1.0}
    assert client_a.get_run(run_a.id).data.params["experiment"] == "mmpipe"
    assert client_b.search_runs([tracking.connect(b, tmp_path).experiment_id]) == []


def test_git_commit_unknown_outside_a_repo(tmp_path):
    assert tracking.git_commit(tmp_path) == "unknown"
    assert len(tracking.git_commit()) in (40, 7) or tracking.git_commit() == "unknown"


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _logged_model(store, root) -> tuple[tracking.Run, str]:
    with tracking.start_run(store, root, run_name="train") as run:
        pass
    with mlflow.start_run(run_id=run.id):
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=[])
    return run, info.model_uri


def test_registry_promotes_first_and_better_only(store, tmp_path):
    p = RegisterParams()
    results = []
    for acc in (0.5, 0.4, 0.5, 0.7):
        run, uri = _logged_model(store, tmp_path)
        results.append(
            tracking.register_and_maybe_promote(run, uri, {"accuracy": acc}, p, data_hash="d1")
        )
    assert [(r["version"], r["promoted"], r["champion_version"]) for r in results] == [
        (1, True, 1),  # first version becomes champion
        (2, False, 1),  # worse: alias stays
        (3, False, 1),  # tie: alias stays
        (4, True, 4),  # better: alias moves
    ]
    client = tracking.connect(store, tmp_path).client
    champion = client.get_model_version_by_alias(p.model_name, p.alias)
    assert int(champion.version) == 4
    assert champion.tags["accuracy"] == "0.7" and champion.tags["data_hash"] == "d1"
    assert results[1]["previous_champion_value"] == 0.5 and results[3]["same_data"]


def test_registry_never_compares_across_data_it_cannot_rescore(store, tmp_path):
    """A champion scored on other data is re-scored on this split, or the alias stays."""
    p = RegisterParams(model_name="cross")
    first = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"accuracy": 0.5}, p, data_hash="old-data"
    )
    better = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"accuracy": 0.9}, p, data_hash="new-data"
    )
    assert first["promoted"] and not better["promoted"]
    assert better["compared_on"] == "refused" and "other data" in better["reason"]
    client = tracking.connect(store, tmp_path).client
    tags = client.get_model_version("cross", str(better["version"])).tags
    assert tags["compared_on"] == "refused" and tags["compared_with_version"] == "1"


def test_registry_lower_is_better_and_missing_metric(store, tmp_path):
    p = RegisterParams(model_name="reg", metric="rmse", greater_is_better=False)
    out = []
    for rmse in (2.0, 3.0, 1.0):
        run, uri = _logged_model(store, tmp_path)
        result = tracking.register_and_maybe_promote(run, uri, {"rmse": rmse}, p, data_hash="d")
        out.append(result["promoted"])
    assert out == [True, False, True]
    with pytest.raises(InputError, match="rmse"):
        tracking.register_and_maybe_promote(run, uri, {"accuracy": 1.0}, p)


def test_parallel_first_starts_share_one_db(tmp_path, monkeypatch):
    """Several processes initialising a fresh store at once (the schema-migration race)."""
    import subprocess
    import sys

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = (
        "import sys; from pathlib import Path; from mmpipe import tracking; "
        "print(tracking.connect(None, Path(sys.argv[1])).experiment_id)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
        for _ in range(3)
    ]
    ids = {p.communicate(timeout=120)[0].decode().strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(ids) == 1 and (tmp_path / ".mmpipe" / "mlflow.db").is_file()


def test_second_project_in_one_process_gets_its_own_store(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; that must not leak into project 2."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.connect(TrackingParams(experiment="e"), tmp_path / "a")
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("/a/.mmpipe/mlflow.db")  # mlflow's export
    uri_b = tracking.tracking_uri(TrackingParams(experiment="e"), tmp_path / "b")
    assert uri_b == f"sqlite:///{tmp_path / 'b' / '.mmpipe' / 'mlflow.db'}"
    # a value the user sets themselves still wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x/y.db")
    assert tracking.tracking_uri(None, tmp_path / "b") == "sqlite:////x/y.db"


def test_registry_does_not_promote_a_model_at_chance(store, tmp_path):
    """coco-mini unlabelled: mean_r1 0.275 on 4 test images (chance 0.25) registered without the
    alias, saying why; a model clear of chance by the margin then becomes the first champion."""
    p = RegisterParams(model_name="chance")
    chance = {"i2t_chance_r1": 0.25, "t2i_chance_r1": 0.25}
    at_chance = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"mean_r1": 0.275, **chance}, p, data_hash="d"
    )
    assert (at_chance["promoted"], at_chance["champion_version"]) == (False, None)
    assert at_chance["compared_on"] == "chance" and at_chance["chance"] == 0.25
    assert at_chance["chance_bar"] == pytest.approx(0.325)
    assert "chance" in at_chance["reason"] and "0.3250" in at_chance["reason"]
    client = tracking.connect(store, tmp_path).client
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("chance", "champion")
    tags = client.get_model_version("chance", "1").tags
    assert "chance" in tags["not_promoted_because"]
    clear = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"mean_r1": 0.5, **chance}, p, data_hash="d"
    )
    assert (clear["promoted"], clear["champion_version"]) == (True, 2)
    # better than the champion, but at chance on its own metric: the alias stays
    worse = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"rmse": 1.0, "rmse_chance": 1.02}, RegisterParams(
            model_name="chance", metric="rmse", greater_is_better=False), data_hash="d",
    )  # fmt: skip
    assert not worse["promoted"] and worse["champion_version"] == 2
    # register.chance_margin null: no chance check (smoke tests of the flow's mechanics only)
    off = RegisterParams(model_name="off", chance_margin=None)
    out = tracking.register_and_maybe_promote(
        *_logged_model(store, tmp_path), {"mean_r1": 0.2, **chance}, off, data_hash="d"
    )
    assert out["promoted"]
