"""report.md / report.html: the headline first (promoted or not, against the champion, what
changed), counts as integers, charts embedded, escaping, and missing parts left out."""

from __future__ import annotations

import math

from mmpipe.io import write_json_atomic
from mmpipe.report import render_html, render_markdown, write_report

PNG = b"\x89PNG\r\n\x1a\nfake"


def _reports(root):
    write_json_atomic(
        root / "metrics.json",
        {
            "accuracy": 0.93751,
            "i2t_r1": float("nan"),
            "n_test_pairs": 591.0,
            "n_test_images": 197.0,
        },
    )
    write_json_atomic(
        root / "ablation.json",
        {"results": [{"fusion": "concat", "accuracy": 0.9, "macro_f1": 0.89}], "note": "frozen"},
    )
    write_json_atomic(
        root / "per_class.json",
        [{"class": "a|b <i>", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 4}],
    )
    (root / "plots").mkdir()
    (root / "plots" / "confusion.png").write_bytes(PNG)
    write_json_atomic(root / "plots" / "training.json", [{"epoch": 1, "train_loss": 2.0}])
    top = [{"rank": 1, "caption": "a <red> circle", "score": 0.5, "correct": True}]
    write_json_atomic(
        root / "examples" / "examples.json",
        [{"image_id": "abc", "thumbnail": "00_abc.png", "top": top}],
    )
    return root


def _context(promoted: bool) -> dict:
    return {
        "origin": "nightly flow",
        "date": "2026-11-26T02:00:05Z",
        "commit": "0123456789abcdef",
        "dirty": True,
        "params_file": "params.yaml",
        "overrides": ["train.epochs=2"],
        "params": {
            "train": {"task": "multiclass", "fusion": "gated", "epochs": 2},
            "register": {"metric": "accuracy"},
        },  # fmt: skip
        "training_data": {"description": "generated shapes", "images": 2000, "captions": 6000},
        "timings": {"train": 300.0, "ingest": 12.5},
        "registered": {
            "model_name": "mmpipe-fusion",
            "version": 3,
            "metric": "accuracy",
            "value": 0.93751,
            "promoted": promoted,
            "previous_champion_version": 2,
            "previous_champion_value": 0.92,
            "champion_version": 3 if promoted else 2,
        },  # fmt: skip
        "champion": {"version": 2, "metrics": {"accuracy": 0.92}, "params": {}},
        "changes": {
            "params": {"train.fusion": ["concat", "gated"]},
            "data": False,
            "commit": ["aaaa", "0123456789abcdef"],
        },
    }


def test_headline_first_with_the_verdict_and_what_changed(tmp_path):
    md = render_markdown(_reports(tmp_path), _context(promoted=True))
    lines = md.splitlines()
    assert lines[0] == "# mmpipe run of 2026-11-26 02:00:05 UTC"
    assert (
        lines[2] == "**mmpipe-fusion v3 promoted to champion: accuracy 0.9375 beats 0.9200 of v2.**"
    )
    order = [md.index(h) for h in ("## This run", "## Headline", "## What changed", "## Training",
                                   "## Classification", "## Fusion ablation", "## All metrics")]  # fmt: skip
    assert order == sorted(order)
    assert "| accuracy | 0.9375 | 0.9200 | +0.0175 | – |" in md  # against the champion
    assert "| train.fusion | concat | gated |" in md and "the same data" in md
    assert "0123456789abcdef (with uncommitted changes)" in md
    assert "params.yaml --set train.epochs=2" in md
    assert "591 test pairs, 197 images." in md  # counts are integers, not 591.0000
    assert "| n_test_pairs | 591 |" in md and "| i2t_r1 | nan |" in md
    assert "| a\\|b <i> | 1.0000 | 0.5000 | 0.6667 | 4 |" in md  # a pipe cannot break the table
    assert "![confusion matrix](plots/confusion.png)" in md
    assert "| total | 312.5 |" in md  # stage timings come from the run record, not the outputs


def test_not_promoted_says_so(tmp_path):
    md = render_markdown(_reports(tmp_path), _context(promoted=False))
    assert "not promoted: accuracy 0.9375 does not beat 0.9200 of the champion v2" in md


def test_html_is_self_contained_and_escaped(tmp_path):
    page = render_html(_reports(tmp_path), _context(promoted=True))
    assert "<title>mmpipe run of 2026-11-26 02:00:05 UTC</title>" in page
    assert "class='verdict good'" in page
    assert "src='data:image/png;base64," in page  # the chart travels with the page
    assert "a &lt;red&gt; circle" in page and "<red>" not in page
    assert "<td>a|b &lt;i&gt;</td>" in page
    assert "src='examples/00_abc.png'" in page  # a missing thumbnail stays a relative link


def test_without_a_run_record_and_with_missing_parts(tmp_path):
    write_json_atomic(tmp_path / "metrics.json", {"accuracy": math.pi})
    paths = write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert paths["markdown"].endswith("report.md") and (tmp_path / "report.html").is_file()
    assert md.startswith("# mmpipe evaluation") and "| accuracy | 3.1416 |" in md
    for absent in ("ablation", "Classification", "Retrieval examples", "What changed", "This run"):
        assert absent not in md


def _unlabelled_at_chance(root) -> tuple:
    """coco-mini without labels: the first version, at chance, registered without the alias."""
    metrics = {"mean_r1": 0.275, "i2t_r1": 0.25, "t2i_r1": 0.3, "i2t_chance_r1": 0.25,
               "t2i_chance_r1": 0.25, "n_test_pairs": 20.0, "n_test_images": 4.0}  # fmt: skip
    write_json_atomic(root / "metrics.json", metrics)
    registered = {
        "model_name": "mmpipe-fusion", "version": 1, "metric": "mean_r1", "value": 0.275,
        "promoted": False, "previous_champion_version": None, "previous_champion_value": None,
        "champion_version": None, "compared_on": "chance", "chance": 0.25, "chance_bar": 0.325,
        "chance_margin": 0.1,
        "reason": "mean_r1 0.2750 does not clear chance 0.2500 by the margin (needs 0.3250)",
    }  # fmt: skip
    context = {"params": {"train": {"task": "multiclass"}, "register": {"metric": None}},
               "registered": registered, "champion": None}  # fmt: skip
    return metrics, registered, context


def test_a_run_at_chance_is_not_a_green_banner_and_is_named_retrieval(tmp_path):
    metrics, _, context = _unlabelled_at_chance(tmp_path)
    md = render_markdown(tmp_path, context)
    assert "registered, not promoted" in md and "first champion" not in md
    assert "chance 0.2500" in md and "0.3250" in md
    assert "task=retrieval" in md and "task=multiclass" not in md
    assert "| mean_r1 | 0.2750 | – | – | 0.2500 |" in md  # the chance column has mean_r1's
    assert "class='verdict good'" not in render_html(tmp_path, context)


def test_model_card_of_a_run_at_chance(tmp_path):
    from mmpipe.modelcard import render_card

    metrics, registered, _ = _unlabelled_at_chance(tmp_path)
    card = render_card(registered=registered, metrics=metrics, data={}, task="retrieval",
                       champion=None, commit="abc", params_note="x")  # fmt: skip
    assert card.startswith("### mmpipe-fusion v1: retrieval")
    assert "**Not promoted**" in card and "**Champion**" not in card
    assert "chance 0.2500" in card and "0.3250" in card and "10%" in card
