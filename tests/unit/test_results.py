"""`make results`: the README's results section comes from a run's reports, every figure from
the files, with the run's commit; only the text between the markers changes."""

from __future__ import annotations

import pytest

from mmpipe.io import write_json_atomic
from mmpipe.results import BEGIN, END, ResultsError, main, metric_tables, replace_section

METRICS = {
    "accuracy": 0.93571,
    "macro_f1": 0.9351,
    "fusion_gain": 0.0221,
    "i2t_r1": 0.5533,
    "i2t_r5": 0.9,
    "t2i_r1": 0.4,
    "t2i_r5": 0.8,
    "i2t_chance_r1": 0.02,
    "i2t_chance_r5": 0.1,
    "t2i_chance_r1": 0.01,
    "t2i_chance_r5": 0.05,
    "n_test_pairs": 591.0,
    "n_test_images": 197.0,
}
ABLATION = [
    {"fusion": "image_only", "accuracy": 0.7, "macro_f1": 0.69},
    {"fusion": "text_only", "accuracy": 0.509, "macro_f1": 0.5},
    {"fusion": "concat", "accuracy": 0.888, "macro_f1": 0.88},
]


def test_tables_hold_the_files_figures():
    confusion = [{"actual": "warm", "predicted": "warm"}] * 3 + [{"actual": "cool"}]
    text = metric_tables(METRICS, [{**r, "configured": r["fusion"] == "concat"} for r in ABLATION],
                         confusion)  # fmt: skip
    assert "| fused accuracy (the trained model) | **0.936** | 0.750 |" in text
    assert "| best unimodal baseline (image only) | 0.700 |" in text
    assert "| image → text R@1 / R@5 | 0.553 / 0.900 | 0.020 / 0.100 |" in text
    assert "| concat (the trained model's) | 0.888 | 0.880 |" in text
    assert "+0.022" in text


def test_readme_section_is_replaced_between_the_markers(tmp_path):
    root = tmp_path
    reports = root / "reports"
    write_json_atomic(reports / "metrics.json", METRICS)
    write_json_atomic(reports / "plots" / "ablation.json", ABLATION)
    write_json_atomic(reports / "ablation.json", {"configured_fusion": "concat"})
    run = {"origin": "nightly flow", "date": "2026-11-26T02:00:05Z", "commit": "abcdef123456789",
           "dirty": False, "timings": {"train": 358.0, "evaluate": 112.0},
           "machine": {"cpus": 2}, "params": {"train": {"fusion": "concat", "epochs": 8}},
           "training_data": {"images": 2000, "captions": 6000}}  # fmt: skip
    write_json_atomic(reports / "run.json", run)
    readme = root / "README.md"
    readme.write_text(f"# x\n\nbefore\n{BEGIN}\nold 0.937\n{END}\nafter\n")
    assert main(["--project-dir", str(root), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{END}\nafter\n")
    assert "old 0.937" not in text and "**0.936**" in text
    assert "at commit `abcdef123456`" in text and "took 7 min 50 s" in text
    with pytest.raises(ResultsError, match="markers"):
        replace_section("no markers", "x")
    assert main(["--project-dir", str(tmp_path / "empty")]) == 2  # no reports: a clear error


def test_the_readme_holds_the_committed_reports_figures():
    """The README's tables are what `make results` makes of the committed metrics and plots."""
    from pathlib import Path

    import yaml

    from mmpipe.io import read_json

    repo = Path(__file__).resolve().parents[2]
    reports = repo / "reports"
    fusion = yaml.safe_load((repo / "params.yaml").read_text())["train"]["fusion"]
    ablation = [
        {**r, "configured": r["fusion"] == fusion}
        for r in read_json(reports / "plots" / "ablation.json")
    ]
    tables = metric_tables(
        read_json(reports / "metrics.json"),
        ablation,
        read_json(reports / "plots" / "confusion.json"),
    )
    assert tables in (repo / "README.md").read_text()
