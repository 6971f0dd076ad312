"""report.md / report.html from evaluate's outputs: tables, links relative to the reports dir,
escaping, and missing parts left out rather than failing."""

from __future__ import annotations

import math

from mmpipe.io import write_json_atomic
from mmpipe.report import render_html, render_markdown, write_report


def _reports(root):
    write_json_atomic(root / "metrics.json", {"accuracy": 0.93751, "i2t_r1": float("nan")})
    write_json_atomic(
        root / "ablation.json",
        {"results": [{"fusion": "concat", "accuracy": 0.9, "macro_f1": 0.89}]},
    )
    write_json_atomic(
        root / "per_class.json",
        [{"class": "a|b <i>", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4}],
    )
    (root / "plots").mkdir()
    (root / "plots" / "confusion_matrix.png").write_bytes(b"\x89PNG")
    top = [{"rank": 1, "caption": "a <red> circle", "score": 0.5, "correct": True}]
    write_json_atomic(
        root / "examples" / "examples.json",
        [{"image_id": "abc", "thumbnail": "00_abc.png", "top": top}],
    )
    return root


def test_markdown_has_every_table_and_relative_links(tmp_path):
    md = render_markdown(_reports(tmp_path))
    assert "| accuracy | 0.9375 |" in md and "| i2t_r1 | nan |" in md  # rounded, nan kept
    assert "| concat | 0.9000 | 0.8900 |" in md
    assert "| a\\|b <i> | 1.0000 | 0.5000 | 0.6667 | 4 |" in md  # a pipe cannot break the table
    assert "![confusion matrix](plots/confusion_matrix.png)" in md
    assert "![abc](examples/00_abc.png)" in md and "1. ✓ a <red> circle (0.500)" in md


def test_html_escapes_text(tmp_path):
    page = render_html(_reports(tmp_path), title="<run>")
    assert "<title>&lt;run&gt;</title>" in page
    assert "a &lt;red&gt; circle" in page and "<red>" not in page
    assert "<td>a|b &lt;i&gt;</td>" in page
    assert "src='examples/00_abc.png'" in page


def test_missing_parts_are_left_out(tmp_path):
    write_json_atomic(tmp_path / "metrics.json", {"accuracy": math.pi})
    paths = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert paths["markdown"].endswith("report.md") and (tmp_path / "report.html").is_file()
    assert "## Metrics" in md and "| accuracy | 3.1416 |" in md
    for absent in ("ablation", "Per class", "Confusion matrix", "Retrieval examples"):
        assert absent not in md
