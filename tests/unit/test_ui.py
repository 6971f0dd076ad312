"""mmpipe.ui without a server: which store, which command, which landing view."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mmpipe import ui
from mmpipe.config import TrackingParams, load_params
from mmpipe.errors import InputError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(metrics: dict[str, float], tags: dict[str, str] | None = None) -> dict:
    """A run as the REST API returns it."""
    return {
        "data": {
            "metrics": [{"key": k, "value": v} for k, v in metrics.items()],
            "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()],
        }
    }


FLOW = {"mmpipe.kind": "flow"}
TRAIN = {"test.accuracy": 0.8, "test.macro_f1": 0.7, "test.i2t_r1": 0.3, "test.t2i_r1": 0.4,
         "test.fusion_gain": 0.1, "val_accuracy": 0.75, "lr": 1e-3, "epoch": 3,
         "test.n_test_pairs": 32, "test.zero_shot_chance": 0.3}  # fmt: skip


@pytest.mark.parametrize(
    "uri",
    [None, "sqlite:///rel/store.db", "sqlite:////abs/store.db", "http://127.0.0.1:5000",
     "postgresql://u:p@db.internal/mlflow"],
)  # fmt: skip
def test_store_uri_is_the_one_the_pipeline_logs_to(uri, tmp_path, monkeypatch):
    from mmpipe import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    expected = tracking.tracking_uri(TrackingParams(uri=uri), tmp_path)
    assert ui.store_uri(uri, tmp_path) == expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.internal:5000")
    assert ui.store_uri(uri, tmp_path) == "http://tracking.internal:5000"  # env wins, as there


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    """mlflow.set_tracking_uri() in earlier tests of this process exports MLFLOW_TRACKING_URI."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_target_follows_the_params(tmp_path):
    params = load_params(
        None,
        ["tracking.uri=sqlite:///db/x.db", "tracking.experiment=exp", "register.model_name=m",
         "train.task=regression", "register.metric=mae"],
    )  # fmt: skip
    target = ui.create_ui_target(params, tmp_path)
    assert target.tracking_uri == f"sqlite:///{tmp_path.resolve()}/db/x.db"
    assert (target.experiment, target.model_name, target.task_metric) == ("exp", "m", "mae")
    # register.metric: null shows the task's default metric
    default = load_params(None, ["train.task=regression"])
    assert ui.create_ui_target(default, tmp_path).task_metric == "rmse"
    assert ui.artifacts_dir(target) == tmp_path.resolve() / "db" / "mlartifacts"


def test_command_binds_loopback_and_keeps_the_store_uri_out_of_argv(tmp_path):
    secret = "postgresql://mlflow:s3cret@db.internal/mlflow"
    target = ui.UiTarget(secret, state_dir=tmp_path / ".mmpipe")
    cmd = ui.ui_command(target, port=5123)
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(tmp_path / ".mmpipe/mlartifacts")
    assert not any("s3cret" in a for a in cmd)  # `ps` shows argv to every user
    env = ui.ui_env(target)
    assert env["MLFLOW_BACKEND_STORE_URI"] == secret
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_missing_sqlite_store_is_a_clear_error_and_creates_nothing(tmp_path):
    target = ui.create_ui_target(load_params(None), tmp_path)
    with pytest.raises(InputError, match="no MLflow store"):
        ui.start_ui(target, port=_free_port()).stop()  # stop: no server left if this fails
    assert not (tmp_path / ".mmpipe").exists()


def test_columns_are_the_declared_headline_metrics_in_order():
    cols = ui.headline_columns([_run(TRAIN)])
    assert cols == [
        "attributes.`Models`", "metrics.`test.accuracy`", "metrics.`test.macro_f1`",
        "metrics.`test.i2t_r1`", "metrics.`test.t2i_r1`", "metrics.`test.fusion_gain`",
        "metrics.`val_accuracy`", "metrics.`test.n_test_pairs`", "metrics.`epoch`",
    ]  # fmt: skip


def test_absent_metrics_get_no_column_and_the_task_metric_comes_first():
    unlabelled = {k: v for k, v in TRAIN.items() if "accuracy" not in k and "f1" not in k}
    cols = ui.headline_columns([_run(unlabelled)])
    assert not any("accuracy" in c or "macro_f1" in c for c in cols)
    assert "metrics.`test.i2t_r1`" in cols
    regression = {"test.rmse": 0.3, "test.mae": 0.2, "val_rmse": 0.35, "test.i2t_r1": 0.1}
    cols = ui.headline_columns([_run(regression)], task_metric="mae")
    assert cols[:4] == [
        "attributes.`Models`", "metrics.`test.mae`", "metrics.`test.rmse`", "metrics.`test.i2t_r1`"
    ]  # fmt: skip


def test_landing_rows_are_the_train_runs_until_the_parent_carries_the_result():
    stage = _run({"bytes": 10.0}, {"mmpipe.kind": "stage"})
    today = [_run({}, FLOW), stage, _run(TRAIN)]
    view = ui.landing_view(today)
    assert view["searchFilter"] == ui.TRAIN_FILTER
    assert view["orderByKey"] == "attributes.end_time"  # not nested under the collapsed parent
    assert view["columnOrder"] == view["selectedColumns"]
    # once the flow logs the headline metrics and `promoted` on its parent run
    later = [_run({**TRAIN, "promoted": 1.0}, FLOW), stage, _run(TRAIN)]
    view = ui.landing_view(later)
    assert view["searchFilter"] == ui.FLOW_FILTER
    assert view["orderByKey"] == "attributes.start_time"  # children stay one click away
    assert "metrics.`promoted`" in view["selectedColumns"]
    assert ui.landing_view([stage])["searchFilter"] == ""  # no results yet: every run


def test_a_saved_view_is_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(ui, "_post_json", lambda url, body, timeout=10.0: calls.append(url) or {})
    exp = {"experiment_id": "1", "tags": [{"key": ui.VIEW_TAG, "value": '{"selectedColumns": []}'}]}
    assert ui.ensure_landing_view("http://x", exp)
    assert calls == []  # not even a search: someone's own view


def test_runs_url_opens_model_training_mode_with_the_view():
    url = ui.runs_url("http://127.0.0.1:5000", "7", view=True)
    assert url == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
        "&viewStateShareKey=mmpipe-training"
    )
    assert Path(ui.__file__).read_text().count("import mlflow") == 0  # fast, light CLI process
