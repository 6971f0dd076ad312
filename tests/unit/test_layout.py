"""mmpipe.layout.STAGES is the one declaration of the DAG; dvc.yaml must say exactly the same."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmpipe.config import Params
from mmpipe.layout import STAGES, Layout

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
DVC_STAGES = [name for name, spec in STAGES.items() if spec.out is not None]


def _names(entries: list) -> list[str]:
    """dvc.yaml list entries are strings or one-key mappings (a path with its options)."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries]


def test_dvc_yaml_has_the_declared_stages_in_order():
    assert list(DVC) == DVC_STAGES


@pytest.mark.parametrize("name", DVC_STAGES)
def test_dvc_stage_lists_exactly_the_declared_params_deps_and_outputs(name):
    stage, spec = DVC[name], STAGES[name]
    assert stage["cmd"] == f"python -m mmpipe {name}"
    assert _names(stage.get("params", [])) == list(spec.params)
    assert stage["deps"] == list(spec.code) + list(spec.inputs)
    written = _names(stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []))
    assert written and all(w == spec.out or w.startswith(f"{spec.out}/") for w in written)


@pytest.mark.parametrize("name", list(STAGES))
def test_declarations_name_real_params_code_and_earlier_outputs(name):
    spec = STAGES[name]
    assert set(spec.params) <= set(Params.model_fields)
    for key in spec.locations:  # section.field of a real field
        section, field = key.split(".")
        assert field in Params.model_fields[section].annotation.model_fields, key
    for path in spec.code:
        assert (REPO / path).exists(), path
    earlier = [STAGES[s].out for s in list(STAGES)[: list(STAGES).index(name)]]
    for path in spec.inputs:
        assert any(path == o or path.startswith(f"{o}/") for o in earlier if o), path


def test_layout_paths_follow_the_declaration(tmp_path):
    layout = Layout(tmp_path)
    assert layout.shard_dir == tmp_path / "data" / "shards" == layout.stage_dir("shard")
    assert layout.model_dir == tmp_path / STAGES["train"].out
    assert layout.inputs("align") == [
        tmp_path / "data/curate/records.parquet",
        tmp_path / "data/curate/images.parquet",
    ]
    assert layout.curate_dir == tmp_path / "data" / "curate"
    assert layout.mlflow_db == tmp_path / ".mmpipe" / "mlflow.db"
    assert layout.prefect_home.parent == layout.state_dir
    with pytest.raises(ValueError, match="MLflow"):
        layout.stage_dir("register")
