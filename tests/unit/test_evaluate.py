"""run_evaluate on tiny WebDataset shards and a tiny random model.

The model is a real, randomly initialised tiny one saved in train's checkpoint format
(tests/conftest.py), so these tests pin evaluate's own logic (metrics, files, determinism)
independent of training.
"""

from __future__ import annotations

import io
import logging
import types

import pytest
import torch
from PIL import Image

from mmpipe.config import EvaluateParams
from mmpipe.io import read_json
from tests.conftest import COLOUR_CLASSES as CLASSES
from tests.conftest import save_random_checkpoint, write_colour_shards


@pytest.fixture
def project(tmp_path):
    """tmp project: data/shards with train + test, models/best.pt of a random tiny model."""
    torch.manual_seed(0)
    shards = write_colour_shards(tmp_path / "data" / "shards")
    save_random_checkpoint(tmp_path / "models" / "best.pt")
    return types.SimpleNamespace(root=tmp_path, shards=shards, models=tmp_path / "models")


# ----------------------------------------------------------------- tests


def _params(**kw) -> EvaluateParams:
    kw.setdefault("ablation_tokens", True)  # every head (the default leaves the slow ones out)
    return EvaluateParams(batch_size=5, ks=[1, 5, 100], ablation_epochs=3, **kw)


def test_evaluate_writes_metrics_plots_and_report(project):
    from mmpipe.evaluate import ABLATION_MODES, run_evaluate
    from mmpipe.report import write_report

    out = project.root / "reports"
    metrics = run_evaluate(project.shards, project.models, _params(), out)
    on_disk = read_json(out / "metrics.json")
    assert on_disk == metrics
    for key in (
        "accuracy",
        "macro_f1",
        "i2t_r1",
        "i2t_r5",
        "i2t_r100",
        "t2i_r1",
        "t2i_r100",
        "i2t_chance_r1",
        "zero_shot_accuracy",
        "best_unimodal_accuracy",
        "fusion_gain",
    ):
        assert key in metrics, key
    assert metrics["n_test_pairs"] == 16 and metrics["n_test_images"] == 8  # images deduplicated
    assert metrics["i2t_r100"] == metrics["t2i_r100"] == 1.0  # K beyond the candidates
    assert metrics["t2i_chance_r1"] == pytest.approx(1 / 8)
    assert metrics["zero_shot_chance"] == 0.5  # circle / square
    assert 0.0 <= metrics["accuracy"] <= 1.0
    for chart in ("confusion", "recall_at_k", "ablation"):  # PNGs for offline eyes
        png = (out / "plots" / f"{chart}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > 100, chart
    rows = read_json(out / "plots" / "recall_at_k.json")  # one row per K, both directions
    assert [r["k"] for r in rows] == [1, 5, 100]
    assert rows[0]["i2t"] == metrics["i2t_r1"] and rows[0]["t2i_chance"] == pytest.approx(1 / 8)
    # this checkpoint has no training history: no curves, and no chart of empty rows
    assert read_json(out / "plots" / "training.json") == []
    assert not (out / "plots" / "training.png").exists()
    ablation = read_json(out / "ablation.json")
    assert [r["fusion"] for r in ablation["results"]] == list(ABLATION_MODES)
    assert ablation["configured_fusion"] == "concat"
    acc = {r["fusion"]: r["accuracy"] for r in ablation["results"]}
    assert metrics["fusion_gain"] == pytest.approx(
        acc["concat"] - max(acc["image_only"], acc["text_only"])
    )
    per_class = read_json(out / "per_class.json")
    assert [r["class"] for r in per_class] == CLASSES and sum(r["support"] for r in per_class) == 16
    assert len(read_json(out / "plots" / "confusion.json")) == 16
    assert not (out / "report.md").exists()  # the caller renders it once, with the run's context
    write_report(out)
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "plots/confusion.png" in report
    examples = read_json(out / "examples" / "examples.json")
    assert examples and all((out / "examples" / e["thumbnail"]).is_file() for e in examples)
    assert all(len(e["top"]) == 3 for e in examples)
    assert not list(out.rglob("*.tmp"))  # atomic writes leave no temp files


def test_evaluate_is_deterministic_and_skips_zero_shot_without_field(project):
    from mmpipe.evaluate import run_evaluate

    a = run_evaluate(project.shards, project.models, _params(), project.root / "a")
    b = run_evaluate(
        project.shards, project.models, _params(zero_shot_field="nope"), project.root / "b"
    )
    assert "zero_shot_accuracy" not in b
    skipped = read_json(project.root / "b" / "evaluation_report.json")["skipped"]
    assert skipped["zero_shot"].startswith("no test sample has meta field 'nope'")
    for key in ("zero_shot_accuracy", "zero_shot_macro_f1", "zero_shot_chance", "zero_shot_n"):
        a.pop(key)
    assert a == b  # same model, same data, seeded ablation heads
    # the versioned outputs zero-shot does not touch are the same bytes (no timings, no paths,
    # no PNG metadata): DVC sees no change when nothing changed
    for name in (
        "ablation.json",
        "per_class.json",
        *(
            f"plots/{c}.{e}"
            for c in ("recall_at_k", "ablation", "confusion")
            for e in ("json", "png")
        ),
    ):
        assert (project.root / "a" / name).read_bytes() == (project.root / "b" / name).read_bytes()


def test_evaluate_without_ablation_and_missing_inputs(project, tmp_path):
    from mmpipe.errors import InputError
    from mmpipe.evaluate import run_evaluate

    m = run_evaluate(project.shards, project.models, _params(ablation=False), tmp_path / "r")
    assert "fusion_gain" not in m and read_json(tmp_path / "r" / "ablation.json")["results"] == []
    with pytest.raises(InputError, match="best.pt or last.pt"):
        run_evaluate(project.shards, tmp_path / "nomodels", _params(), tmp_path / "r2")
    with pytest.raises(InputError, match="manifest.json"):
        run_evaluate(tmp_path / "noshards", project.models, _params(), tmp_path / "r3")


def test_token_heads_in_the_ablation_are_opt_in(project, tmp_path):
    """evaluate.ablation_tokens (default false, they are slow): off, only the pooled heads
    train; on, the token-level heads are scored beside them."""
    from mmpipe.evaluate import ABLATION_MODES, run_evaluate
    from mmpipe.model import TOKEN_LEVEL

    assert EvaluateParams().ablation_tokens is False
    run_evaluate(project.shards, project.models, _params(ablation_tokens=False), tmp_path / "r")
    rows = read_json(tmp_path / "r" / "ablation.json")["results"]
    assert [r["fusion"] for r in rows] == [m for m in ABLATION_MODES if m not in TOKEN_LEVEL]
    assert {"cross_attention_pooled", "concat"} <= {r["fusion"] for r in rows}
    run_evaluate(project.shards, project.models, _params(ablation_tokens=True), tmp_path / "t")
    rows = read_json(tmp_path / "t" / "ablation.json")["results"]
    assert [r["fusion"] for r in rows] == list(ABLATION_MODES)


def test_evaluate_falls_back_to_last_checkpoint(project, tmp_path):
    from mmpipe.evaluate import run_evaluate

    (project.models / "best.pt").rename(project.models / "last.pt")
    run_evaluate(project.shards, project.models, _params(ablation=False), tmp_path / "r")
    assert read_json(tmp_path / "r" / "evaluation_report.json")["checkpoint"] == "last.pt"


def test_evaluate_logs_progress_of_long_passes(project, caplog):
    """The flow log shows evaluate's passes batch by batch and the ablation head by head."""
    from mmpipe.evaluate import ABLATION_MODES, run_evaluate

    with caplog.at_level(logging.INFO, logger="mmpipe.evaluate"):
        run_evaluate(project.shards, project.models, _params(), project.root / "r")
    lines = [r.getMessage() for r in caplog.records]
    assert "evaluate: embedding of the test split, batch 4/4" in lines  # 16 pairs, batch 5
    assert "evaluate: ablation features of the train split, batch 5/5" in lines  # 24 pairs
    heads = [m for m in lines if m.startswith("evaluate: ablation head")]
    assert [m.split()[4].rstrip(":") for m in heads] == list(ABLATION_MODES)
    assert heads[0].startswith(f"evaluate: ablation head 1/{len(ABLATION_MODES)} image_only")


def test_hashes_are_not_metrics_and_register_checks_them_beside_the_metrics(project):
    """metrics.json holds numbers only (`dvc exp show` lists every key as a metric); what they
    scored (checkpoint and data sha256) is in evaluation_report.json, which register reads,
    and only when that report is the same evaluation's as metrics.json."""
    from mmpipe.errors import InputError
    from mmpipe.evaluate import run_evaluate
    from mmpipe.io import sha256_file, write_json_atomic
    from mmpipe.layout import Layout
    from mmpipe.pipeline import check_provenance

    layout = Layout(project.root)
    run_evaluate(project.shards, project.models, _params(ablation=False), layout.eval_dir)
    metrics = read_json(layout.eval_dir / "metrics.json")
    assert all(isinstance(v, int | float) for v in metrics.values()), metrics
    scored = read_json(layout.eval_dir / "evaluation_report.json")["scored"]
    assert scored["checkpoint_sha256"] == sha256_file(project.models / "best.pt")
    assert scored["data_sha256"] == sha256_file(project.shards / "manifest.json")
    write_json_atomic(project.models / "train_report.json", {"data_hash": scored["data_sha256"]})
    assert check_provenance(metrics, layout) == scored["data_sha256"]
    # another evaluation's metrics (only metrics.json restored, say): refused, never trusted
    with pytest.raises(InputError, match="records no checkpoint"):
        check_provenance({**metrics, "accuracy": -1.0}, layout)


def test_an_experiment_leaves_the_ablation_out_unless_asked(project, monkeypatch):
    """evaluate.ablation: auto (params.yaml's) runs the heads at night and leaves them out under
    `dvc exp run` (DVC_EXP_BASELINE_REV set), saying why; an explicit true runs them there."""
    from mmpipe.config import Params, load_params
    from mmpipe.evaluate import EXPERIMENT_ENV, ablation_enabled
    from mmpipe.layout import Layout
    from mmpipe.pipeline import stage_evaluate
    from tests.conftest import REPO

    assert load_params(REPO / "params.yaml").evaluate.ablation == "auto"
    auto = EvaluateParams()
    assert ablation_enabled(auto, experiment=False) == (True, None)
    assert ablation_enabled(EvaluateParams(ablation=True), experiment=True) == (True, None)
    assert ablation_enabled(EvaluateParams(ablation=False), experiment=False) == (False, None)

    monkeypatch.setenv(EXPERIMENT_ENV, "0" * 40)  # what `dvc exp run` sets for its stages
    layout = Layout(project.root)
    metrics = stage_evaluate(Params(evaluate=_params(ablation="auto")), layout)
    assert "fusion_gain" not in metrics and "accuracy" in metrics
    assert read_json(layout.eval_dir / "ablation.json")["enabled"] is False
    skipped = read_json(layout.eval_dir / "evaluation_report.json")["skipped"]
    assert "dvc exp run" in skipped["ablation"] and "evaluate.ablation=true" in skipped["ablation"]


def test_evaluate_and_register_rescoring_share_one_path_and_its_class_check(project, tmp_path):
    """score_checkpoint (register's re-scoring) gives evaluate's metrics but the ablation's
    summary; a checkpoint trained on other classes is refused by both."""
    from mmpipe.errors import InputError
    from mmpipe.evaluate import run_evaluate, score_checkpoint

    p = _params(ablation=False)
    metrics = run_evaluate(project.shards, project.models, p, tmp_path / "reports")
    assert score_checkpoint(project.models / "best.pt", project.shards, p) == metrics
    other = save_random_checkpoint(tmp_path / "other" / "best.pt", classes=CLASSES[::-1])
    with pytest.raises(InputError, match="trained on classes"):
        score_checkpoint(other, project.shards, p)
    with pytest.raises(InputError, match="trained on classes"):
        run_evaluate(project.shards, other.parent, p, tmp_path / "reports2")
