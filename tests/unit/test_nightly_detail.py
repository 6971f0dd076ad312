"""The flow's summary line of a stage (flows.nightly.detail): a stage it has no line for (a new
one) still gets its numbers, never a KeyError that would fail a run that succeeded."""

from __future__ import annotations

from flows.nightly import detail


def test_known_stages_show_their_figures():
    assert detail("align", {"pairs": 12, "orphan_images": 1, "split": "x"}) == (
        "pairs=12, orphan_images=1"
    )
    assert detail("register", {"version": 3, "promoted": True}) == "version=3, promoted=True"


def test_a_stage_without_its_own_line_shows_its_numbers_and_flags():
    result = {"rows": 5, "score": 0.12345, "ok": False, "path": "x", "nested": {"a": 1}}
    assert detail("dedupe", result) == "rows=5, score=0.1235, ok=False"
