"""The Prefect tasks, called as plain functions (``task.fn``): what they pass to the pipeline,
their cache keys, and which failures they retry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mmpipe import pipeline
from mmpipe.config import load_params
from mmpipe.errors import InputError
from mmpipe.layout import Layout
from tasks import stages
from tests.conftest import TINY_OVERRIDES


@pytest.fixture
def params():
    return load_params(None, TINY_OVERRIDES)


def test_data_task_runs_the_stage_with_the_flows_params(params, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(
        pipeline, "run_data_stage", lambda *a, **kw: seen.append((a, kw)) or {"ok": 1}
    )
    layout = Layout(tmp_path)
    assert stages.data_task.fn("align", params, layout, parent_run_id="p1") == {"ok": 1}
    assert seen == [(("align", params, layout), {"parent_run_id": "p1"})]


def test_model_tasks_pass_resume_and_the_parent_run(params, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "stage_train", lambda *a, **kw: seen.append((a, kw)) or {})
    monkeypatch.setattr(pipeline, "run_stage", lambda *a, **kw: seen.append((a, kw)) or {})
    # the register metric is checked against the shards before training
    monkeypatch.setattr(pipeline, "check_register_metric", lambda *a: seen.append(("check", a)))
    layout = Layout(tmp_path)
    stages.train_task.fn(params, layout, parent_run_id="p1", resume=True)
    stages.model_task.fn("register", params, layout, parent_run_id="p1")
    assert seen == [
        ("check", (params, layout)),
        ((params, layout), {"resume": True, "parent_run_id": "p1"}),
        (("register", params, layout), {"parent_run_id": "p1"}),
    ]


def test_cache_key_is_the_stage_project_and_fingerprint(params, tmp_path):
    a, b = Layout(tmp_path / "a"), Layout(tmp_path / "b")
    key = stages.data_cache_key(None, {"stage": "ingest", "params": params, "layout": a})
    assert key.startswith("mmpipe-ingest-")
    assert key.endswith(pipeline.stage_fingerprint("ingest", params, a))
    assert key == stages.data_cache_key(None, {"stage": "ingest", "params": params, "layout": a})
    assert key != stages.data_cache_key(None, {"stage": "ingest", "params": params, "layout": b})
    other = load_params(None, [*TINY_OVERRIDES, "ingest.synthetic.seed=1"])
    assert key != stages.data_cache_key(None, {"stage": "ingest", "params": other, "layout": a})


def test_data_stage_refreshes_the_cache_unless_outputs_are_current(params, tmp_path, monkeypatch):
    layout = Layout(tmp_path)
    monkeypatch.setattr(pipeline, "stage_is_current", lambda *a: True)
    assert stages.data_stage("align", params, layout) is stages.data_task
    monkeypatch.setattr(pipeline, "stage_is_current", lambda *a: False)
    assert stages.data_stage("align", params, layout).refresh_cache is True


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        (OSError("connection reset"), True),
        (FileNotFoundError("gone"), False),
        (InputError("bad captions.csv"), False),
        (ValueError("a bug"), False),
    ],
)
def test_only_transient_io_errors_are_retried(exc, retried):
    state = SimpleNamespace(result=lambda raise_on_failure: exc)
    assert stages.retry_on_io(None, None, state) is retried
