"""mmpipe.pipeline's content cache: a data stage's fingerprint covers its params section, its code
and its inputs, and its stamp vouches for its outputs only while they are current."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from mmpipe import pipeline
from mmpipe.config import load_params
from mmpipe.io import read_json
from mmpipe.layout import Layout
from tests.conftest import TINY_OVERRIDES


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Layout:
    """A tiny project with ingest, align and shard run once (copied per test)."""
    layout = Layout(tmp_path_factory.mktemp("built"))
    params = load_params(None, TINY_OVERRIDES)
    for stage in pipeline.DATA_STAGES:
        pipeline.run_data_stage(stage, params, layout)
    return layout


@pytest.fixture
def layout(built, tmp_path) -> Layout:
    shutil.copytree(built.root, tmp_path, dirs_exist_ok=True)
    return Layout(tmp_path)


def _params(*extra: str):
    return load_params(None, [*TINY_OVERRIDES, *extra])


def test_fresh_outputs_are_current_and_fingerprints_are_stable(layout):
    params = _params()
    for stage in pipeline.DATA_STAGES:
        assert pipeline.stage_is_current(stage, params, layout), stage
        first = pipeline.stage_fingerprint(stage, params, layout)
        assert first == pipeline.stage_fingerprint(stage, _params(), layout)


def test_a_params_change_invalidates_only_its_own_stage(layout):
    params = _params("shard.jpeg_quality=70")
    assert not pipeline.stage_is_current("shard", params, layout)
    assert pipeline.stage_is_current("align", params, layout)
    assert pipeline.stage_is_current("ingest", params, layout)


def test_a_changed_input_invalidates_the_stages_that_read_it(layout):
    """shard (and curate) read ingest's report.json (where the data root is): a change there
    re-runs shard though pairs.parquet is unchanged, and not align, which does not read it; a
    changed records.parquet re-runs curate (and align only once curate has rewritten its own
    records.parquet)."""
    params = _params()
    report = layout.ingest_dir / "report.json"
    report.write_text(report.read_text().replace("}", ', "data_root": "elsewhere"}', 1))
    assert not pipeline.stage_is_current("shard", params, layout)
    assert not pipeline.stage_is_current("curate", params, layout)
    assert pipeline.stage_is_current("align", params, layout)
    assert pipeline.stage_is_current("ingest", params, layout)
    records = layout.ingest_dir / "records.parquet"
    table = pd.read_parquet(records)
    table.loc[0, "source"] = "elsewhere"
    table.to_parquet(records, index=False)
    assert not pipeline.stage_is_current("curate", params, layout)
    assert pipeline.stage_is_current("align", params, layout)
    curated = layout.curate_dir / "records.parquet"
    table.to_parquet(curated, index=False)
    assert not pipeline.stage_is_current("align", params, layout)


def test_a_missing_stamp_or_output_is_not_current(layout):
    params = _params()
    (layout.align_dir / pipeline.STAMP).unlink()
    assert not pipeline.stage_is_current("align", params, layout)
    shutil.rmtree(layout.shard_dir)
    assert not pipeline.stage_is_current("shard", params, layout)


def test_a_code_change_invalidates_the_stage(layout, tmp_path_factory, monkeypatch):
    params = _params()
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(Path(pipeline.__file__).parent, repo / "mmpipe")
    monkeypatch.setattr(pipeline, "_REPO", repo)
    assert pipeline.stage_is_current("align", params, layout)  # same code, other place
    # parallel.py runs ingest's and shard's per-chunk work; align never imports it
    with (repo / "mmpipe" / "parallel.py").open("a") as fh:
        fh.write("\n# changed\n")
    assert not pipeline.stage_is_current("shard", params, layout)
    assert not pipeline.stage_is_current("ingest", params, layout)
    assert pipeline.stage_is_current("align", params, layout)


def test_user_source_files_are_fingerprinted_by_size_and_mtime(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "captions.csv").write_text("image,caption\n")
    params = _params("ingest.source=folder", f"ingest.root={root}")
    layout = Layout(tmp_path / "proj")
    before = pipeline.stage_fingerprint("ingest", params, layout)
    (root / "captions.csv").write_text("image,caption\na.jpg,a cat\n")
    assert pipeline.stage_fingerprint("ingest", params, layout) != before


def test_a_failed_run_leaves_no_stamp(layout, monkeypatch):
    params = _params()

    def broken(params, layout, out_dir):
        (out_dir / "pairs.parquet").write_bytes(b"half")
        raise OSError("connection reset")

    before = {p.name: p.read_bytes() for p in layout.align_dir.iterdir()}
    monkeypatch.setitem(pipeline._DATA_FUNCTIONS, "align", broken)
    with pytest.raises(OSError):
        pipeline.run_data_stage("align", params, layout)
    # the previous output, stamp included, exactly as it was; nothing left beside it
    assert {p.name: p.read_bytes() for p in layout.align_dir.iterdir()} == before
    assert sorted(p.name for p in layout.root.joinpath("data").iterdir()) == [
        "align", "curate", "ingest", "shards"
    ]  # fmt: skip


def test_a_rerun_replaces_the_whole_output(layout):
    """Fewer shards the second time: none of the first run's may survive beside them."""
    pipeline.run_data_stage("shard", _params("shard.maxcount=10"), layout)
    before = {p.name for p in layout.shard_dir.iterdir()}
    assert len([n for n in before if n.startswith("train-")]) > 1
    params = _params("shard.maxcount=1000")
    pipeline.run_data_stage("shard", params, layout)
    manifest = read_json(layout.shard_dir / "manifest.json")
    listed = {s["name"] for e in manifest["splits"].values() for s in e["shards"]}
    # rejects.jsonl: shard's decode is the check under the default ingest.image_check: header
    files = {"manifest.json", "members.parquet", ".stamp.json", "rejects.jsonl"}
    assert {p.name for p in layout.shard_dir.iterdir()} == listed | files
    assert pipeline.stage_is_current("shard", params, layout)


def test_a_data_stage_run_in_mlflow_lasts_as_long_as_the_stage(layout, monkeypatch):
    """The nested MLflow run of a data stage starts when the stage starts (it is created when the
    stage has finished), so its duration is the stage's, not the few ms of logging it."""
    import time

    from mmpipe import tracking

    params = _params()
    align = pipeline._DATA_FUNCTIONS["align"]

    def slow(params, layout, out_dir):
        time.sleep(1.5)
        return align(params, layout, out_dir)

    monkeypatch.setitem(pipeline._DATA_FUNCTIONS, "align", slow)
    parent = tracking.open_parent_run(params.tracking, layout.root, params)
    called = time.time() * 1000
    pipeline.run_data_stage("align", params, layout, parent_run_id=parent)
    store = tracking.connect(params.tracking, layout.root)
    runs = store.client.search_runs([store.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    (run,) = runs
    assert run.info.run_name == "align"
    # started before the stage's 1.5 s of work, not when it was logged after it
    assert run.info.start_time - called < 1500 <= run.info.end_time - run.info.start_time
