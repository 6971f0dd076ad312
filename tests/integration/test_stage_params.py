"""Every stage reads exactly the params sections mmpipe/layout.py declares for it (and dvc.yaml
lists, see tests/unit/test_layout.py), plus `tracking` where it logs to MLflow. Checked by
running each stage on tiny data with params that record which sections are read."""

from __future__ import annotations

import pytest

from mmpipe import pipeline
from mmpipe.config import Params, load_params
from mmpipe.layout import STAGES, Layout
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def recording(params: Params, seen: set[str]) -> Params:
    """A copy of ``params`` that adds the name of every section read to ``seen``."""

    class Recording(Params):
        def __getattribute__(self, name: str):
            if name in Params.model_fields:
                seen.add(name)
            return super().__getattribute__(name)

    copy = Recording.model_validate(params.model_dump())
    seen.clear()  # validating reads across sections (register.metric vs train.task): not a stage
    return copy


def test_each_stage_reads_exactly_its_declared_sections(tmp_path, monkeypatch):
    from mmpipe import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = Layout(tmp_path)
    params = load_params(None, TINY_OVERRIDES)
    parent = tracking.open_parent_run(params.tracking, tmp_path)  # as under the nightly flow
    for stage in pipeline.ORDER:
        seen: set[str] = set()
        pipeline.run_stage(stage, recording(params, seen), layout, parent_run_id=parent)
        declared = set(STAGES[stage].params)
        assert declared <= seen, f"{stage} does not read {declared - seen}"
        located = {key.split(".")[0] for key in STAGES[stage].locations}  # shard.output
        assert seen - declared <= {"tracking", *located}, f"{stage} reads {seen - declared}"
