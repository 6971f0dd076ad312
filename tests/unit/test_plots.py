"""The plots `dvc plots show` draws from evaluate's rows: every field a Vega spec encodes is in the
rows (the ablation chart was empty with x and y swapped), recall@K draws one line per direction,
and the PNG beside each JSON is the same chart, byte-identical for the same rows."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmpipe.io import write_json_atomic
from mmpipe.plots import PLOT_FIELDS, recall_rows, training_rows, write_plot

REPO = Path(__file__).resolve().parents[2]
# fields Vega computes itself (DVC's templates), or DVC adds to every row
COMPUTED = {"rev", "field", "dvc_inferred_y_value"}


def _rows() -> dict[str, list[dict[str, Any]]]:
    chance = {"i2t": {1: 0.1, 5: 0.4}, "t2i": {1: 0.05, 5: 0.25}}
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.5 / e, "val_accuracy": 0.4 + e / 10}
        for e in (1, 2, 3)
    ]
    return {
        "recall_at_k": recall_rows([1, 5], {1: 0.5, 5: 0.9}, {1: 0.4, 5: 0.8}, chance),
        "ablation": [
            {"fusion": "image_only", "score": 0.6},
            {"fusion": "concat", "score": 0.9},
        ],
        "confusion": [{"actual": "circle", "predicted": p} for p in ("circle", "square")],
        "training": training_rows(history),
    }


def _named(node: Any, key: str) -> set[str]:
    """Every string under ``key`` in a Vega-Lite spec, at any depth (``field``: what it encodes,
    ``as``: what its transforms compute)."""
    if isinstance(node, dict):
        own = {node[key]} if isinstance(node.get(key), str) else set()
        return own.union(*(_named(v, key) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_named(v, key) for v in node))
    return set()


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """`dvc plots show --json` of the project's dvc.yaml over generated rows: title -> spec."""
    root = tmp_path_factory.mktemp("plots")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=root, check=True)
    for name, rows in _rows().items():
        write_json_atomic(root / "reports" / "plots" / f"{name}.json", rows)
    proc = subprocess.run(
        [dvc, "plots", "show", "--json"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return {
        title: entries[0]["content"] for title, entries in json.loads(proc.stdout)["data"].items()
    }


def test_every_declared_plot_renders_with_the_fields_of_its_rows(shown):
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert set(shown) == {next(iter(p)) for p in declared}
    for title, spec in shown.items():
        values = spec["data"]["values"]
        assert values, f"{title}: no data"
        present = set().union(*(row.keys() for row in values)) | _named(spec, "as") | COMPUTED
        missing = _named(spec, "field") - present
        assert not missing, f"{title}: the spec encodes {missing}, the rows do not have them"


def test_recall_draws_each_direction_and_its_chance_as_its_own_line(shown):
    spec = shown["Retrieval recall@K (test split)"]
    lines = {row["field"] for row in spec["data"]["values"]}
    assert lines == {"i2t", "t2i", "i2t_chance", "t2i_chance"}


def test_ablation_bars_are_the_task_score_per_head(shown):
    enc = shown["Fusion ablation, test score per head"]["encoding"]
    assert (enc["x"]["field"], enc["x"]["type"]) == ("score", "quantitative")
    assert (enc["y"]["field"], enc["y"]["type"]) == ("fusion", "nominal")


def test_plot_fields_are_what_the_rows_hold():
    for name, rows in _rows().items():
        assert set(PLOT_FIELDS[name]) <= set(rows[0]), name


def test_png_beside_each_json_is_deterministic(tmp_path):
    rows = _rows()
    for out in ("a", "b"):
        write_plot(tmp_path / out, "recall_at_k", rows["recall_at_k"])
        write_plot(tmp_path / out, "ablation", rows["ablation"], "concat", "accuracy")
        write_plot(tmp_path / out, "training", rows["training"])
    for name in ("recall_at_k", "ablation", "training"):
        png = (tmp_path / "a" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and png == (tmp_path / "b" / f"{name}.png").read_bytes()
    write_plot(tmp_path / "a", "training", [])  # no rows: no stale chart beside them
    assert not (tmp_path / "a" / "training.png").exists()
