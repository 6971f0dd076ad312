"""benchmarks/classic_systems.py: the README's tasks table is written from a run's results."""

from __future__ import annotations

import json

import pytest

from benchmarks import classic_systems as cs


def _row(name: str, task: str, metric: str, value: float) -> dict:
    metrics = {metric: value, f"{metric}_chance": 0.25, f"best_unimodal_{metric}": 0.5}
    results = [{"fusion": "image_only", "score": 0.3}, {"fusion": "text_only", "score": 0.2}]
    if task == "vqa":
        metrics["vqa_accuracy_how_many"] = 0.7
    return {"name": name, "system": cs.CONFIGS[name], "task": task, "metrics": metrics,
            "ablation": {"metric": metric, "results": results}}  # fmt: skip


def _saved(tmp_path, names, **extra):
    rows = [_row(n, "vqa" if n.startswith("vqa") else "multiclass",
                 "vqa_accuracy" if n.startswith("vqa") else "accuracy", 0.9) for n in names]  # fmt: skip
    path = tmp_path / "classic_systems.json"
    path.write_text(json.dumps({"mode": "full", "overrides": [], "rows": rows, **extra}))
    return path


def test_readme_table_comes_from_the_saved_run(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{cs.README_START}\nold\n{cs.README_END}\nafter\n")
    monkeypatch.setattr(cs, "REPO", tmp_path)
    monkeypatch.setattr(cs.update_readme, "__defaults__", (readme,))
    assert cs.main(["--readme-from", str(_saved(tmp_path, list(cs.CONFIGS)))]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert (
        "| `configs/sentiment_lstm_cnn.yaml` | multiclass | accuracy | **0.900** | 0.250 |" in text
    )
    assert "question only (text-only head) **0.200**" in text and "how many 0.700" in text


@pytest.mark.parametrize(
    "bad", [{"mode": "smoke"}, {"overrides": ["train.epochs=1"]}, {"rows": []}]
)
def test_readme_refuses_a_partial_or_smoke_run(tmp_path, bad):
    path = _saved(tmp_path, list(cs.CONFIGS))
    path.write_text(json.dumps({**json.loads(path.read_text()), **bad}))
    with pytest.raises(SystemExit, match="not a complete full-size run"):
        cs.readme_from(path)
