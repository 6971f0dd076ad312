"""benchmarks/trimodal.py: the README's tri-modal table comes from a saved full run."""

from __future__ import annotations

import json

import pytest

from benchmarks import trimodal as tm
from tests.conftest import readme_table_from


def _saved(tmp_path, mode="full", overrides=None):
    base = {"accuracy": 0.9, "accuracy_chance": 0.5, "i2t_r1": 0.4, "t2i_r1": 0.3}
    audio = {**base, "accuracy": 0.95, "i2a_r1": 0.2, "a2i_r1": 0.1, "t2a_r1": 0.25, "a2t_r1": 0.3}
    rows = [{"model": "image + text", "metrics": base},
            {"model": "image + text + audio", "metrics": audio}]  # fmt: skip
    path = tmp_path / "trimodal.json"
    payload = {"mode": mode, "overrides": tm.FULL if overrides is None else overrides}
    path.write_text(json.dumps({**payload, "rows": rows}))
    return path


def test_readme_table_from_a_saved_full_run(tmp_path, monkeypatch):
    text = readme_table_from(tm, _saved(tmp_path), tmp_path, monkeypatch)
    assert "| image + text | **0.900** | 0.500 | 0.400 | 0.300 | — | — | — | — |" in text
    assert "| image + text + audio | **0.950** | 0.500 | 0.400 | 0.300 | 0.200 | 0.100 |" in text


@pytest.mark.parametrize("bad", [{"mode": "smoke"}, {"overrides": ["train.epochs=1"]}])
def test_readme_refuses_a_smoke_or_changed_run(tmp_path, bad):
    with pytest.raises(SystemExit, match="not a full-size run"):
        tm.main(["--readme-from", str(_saved(tmp_path, **bad))])


def test_the_ablation_rows_show_each_modality(tmp_path, monkeypatch):
    """A run with the tri-modal ablation adds a table of each modality set's accuracy."""
    path = _saved(tmp_path)
    saved = json.loads(path.read_text())
    saved["rows"][1]["ablation"] = {"image_only": 0.6, "text_only": 0.55, "audio_only": 0.7,
                                    "concat": 0.8, "concat+audio": 0.9, "sum": 0.79}  # fmt: skip
    path.write_text(json.dumps(saved))
    readme = tmp_path / "README.md"
    readme.write_text(f"{tm.START}\n{tm.END}\n")
    monkeypatch.setattr(tm.update_readme, "__defaults__", (readme,))
    assert tm.main(["--readme-from", str(path)]) == 0
    text = readme.read_text()
    assert "| image + text + audio | 0.600 | 0.550 | 0.700 | 0.800 | 0.900 |" in text
    assert text.count("| frozen features of |") == 1  # only the run with audio rows
