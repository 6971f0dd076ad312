"""benchmarks/captioning.py: the README's captioning table comes from a saved full run."""

from __future__ import annotations

import json

import pytest

from benchmarks import captioning as bc
from tests.conftest import readme_table_from


def _saved(tmp_path, mode="full", overrides=None):
    metrics = {"bleu4": 0.31, "cider": 0.9, "nn_bleu4": 0.2, "nn_cider": 0.5,
               "n_caption_images": 60.0}  # fmt: skip
    payload = {"mode": mode, "overrides": bc.FULL if overrides is None else overrides,
               "metrics": metrics, "beam": 3,
               "samples_per_s": {"captioning": 20.0, "concat head": 25.0}}  # fmt: skip
    path = tmp_path / "captioning.json"
    path.write_text(json.dumps(payload))
    return path


def test_readme_table_from_a_saved_full_run(tmp_path, monkeypatch):
    text = readme_table_from(bc, _saved(tmp_path), tmp_path, monkeypatch)
    assert "| decoder, beam search (3 beams) | **0.310** | **0.900** |" in text
    assert "| nearest-neighbour train caption (baseline) | 0.200 | 0.500 |" in text
    assert "20 samples/s for the captioning model vs 25" in text and "ratio 0.80" in text
    assert "`python -m benchmarks.captioning --update-readme`" in text


def test_the_samples_per_s_say_on_what_machine_and_load(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    saved = json.loads(path.read_text())
    saved["machine"] = {"cores": 2, "cpu": "Some CPU", "gpu": False}
    path.write_text(json.dumps({**saved, "throughput_load": 3.14}))
    text = readme_table_from(bc, path, tmp_path, monkeypatch)
    assert "(ratio 0.80, measured side by side on 2 cores (Some CPU, no GPU), 1-min load " \
           "average 3.1 when measured)." in text  # fmt: skip


@pytest.mark.parametrize("bad", [{"mode": "smoke"}, {"overrides": ["train.epochs=1"]}])
def test_readme_refuses_a_smoke_or_changed_run(tmp_path, bad):
    with pytest.raises(SystemExit, match="not a full-size run"):
        bc.main(["--readme-from", str(_saved(tmp_path, **bad))])


def test_update_readme_refuses_the_smoke_size_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="needs the full-size run"):
        bc.main(["--smoke", "--update-readme", "--work-dir", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
