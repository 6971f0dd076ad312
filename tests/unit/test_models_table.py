"""benchmarks/bench_models.py: the README's fusion-family table and its markers."""

from __future__ import annotations

import pytest

from benchmarks import _common as c
from benchmarks import bench_models as bm


def _row(family: str, sps: float, itm: float | None = None) -> dict:
    return {"family": family, "accuracy": 0.9, "macro_f1": 0.85, "itm_accuracy": itm,
            "samples_per_s": sps, "parameters": 1_250_000}  # fmt: skip


def test_table_gives_speed_as_a_ratio_to_concat_and_itm_where_it_applies(tmp_path):
    table = bm.markdown([_row("concat", 100.0), _row("single_stream", 25.0, itm=0.75)])
    assert "| concat | **0.900** | 0.850 | — | 100.0 | 1.00× | 1.25M |" in table
    assert "| single_stream | **0.900** | 0.850 | 0.750 | 25.0 | 0.25× | 1.25M |" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bm.START}\nold\n{bm.END}\nafter\n")
    c.update_readme_block(bm.START, bm.END, table, bm.COMMAND, readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert f"(`{bm.COMMAND}`," in text
    with pytest.raises(SystemExit, match="markers"):
        c.update_readme_block("<!-- x -->", "<!-- y -->", "", "", tmp_path / "README.md")


def test_only_the_full_run_rewrites_the_readme():
    with pytest.raises(SystemExit, match="full-size"):
        bm.main(["--smoke", "--update-readme"])
