"""Every task end to end through `mmpipe run` to a registered model, at smoke size.

Each classic system of configs/ runs as a user would (`mmpipe run --params configs/<name>.yaml`)
with the tiny overrides appended; between them they cover every task (multiclass, regression,
multilabel with multi-hot labels, vqa, binary) and a two-stage training. The visual-entailment
sample trains on two text columns, and warm-starts from the registry's champion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmpipe.cli import main
from tests.conftest import REPO, SHARED_DATA, TINY_OVERRIDES

pytestmark = pytest.mark.slow


def mmpipe_run(project: Path, params: Path | None, overrides: list[str], capsys) -> dict:
    """`mmpipe run` in-process; the printed result (every stage's report). No params file: the
    defaults."""
    if params is None:
        params = project / "params.yaml"
        params.write_text("{}\n")
    argv = ["run", "--project-dir", str(project), "--params", str(params)]
    for o in [*TINY_OVERRIDES, *overrides, *one_epoch_stages(params)]:
        argv += ["--set", o]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    return json.loads(capsys.readouterr().out)


def one_epoch_stages(params: Path) -> list[str]:
    """The params file's train.stages with one epoch each (smoke size), as an override."""
    import yaml

    stages = (yaml.safe_load(params.read_text()) or {}).get("train", {}).get("stages")
    if not stages:
        return []
    return ["train.stages=" + json.dumps([{**s, "epochs": 1} for s in stages])]


def _reports(project: Path) -> tuple[dict, dict]:
    reports = project / "reports"
    return (
        json.loads((reports / "metrics.json").read_text()),
        json.loads((reports / "evaluation_report.json").read_text()),
    )


# config -> (task, register metric, lower is better, metrics it must write, plots it must draw)
CASES = {
    "sentiment_lstm_cnn": ("multiclass", "accuracy", False, ["accuracy", "macro_f1"],
                           ["confusion.png"]),
    "regression_cnn_rnn": ("regression", "rmse", True, ["mae", "rmse", "r2"],
                           ["predicted_vs_true.png"]),
    "multilabel_cnn_lstm": ("multilabel", "map", False, ["micro_f1", "macro_f1", "map"], []),
    "vqa_lstm_resnet": ("vqa", "vqa_accuracy", False, ["vqa_accuracy"], []),
    "clip_pretrain_finetune": ("binary", "macro_f1", False, ["accuracy", "macro_f1", "auroc"],
                               ["roc.png", "confusion.png"]),
    "pretrained_attention": ("multiclass", "accuracy", False, ["accuracy", "macro_f1"], []),
    "vilt_vqa": ("vqa", "vqa_accuracy", False, ["vqa_accuracy"], []),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_classic_system_config_runs_to_a_registered_model(name, tmp_path, capsys):
    task, metric, lower, expected, plots = CASES[name]
    out = mmpipe_run(tmp_path, REPO / "configs" / f"{name}.yaml", [], capsys)
    metrics, report = _reports(tmp_path)
    assert report["task"] == task and not report["skipped"].get("task_metrics")
    for key in [*expected, f"{metric}_chance", f"best_unimodal_{metric}", "fusion_gain",
                "mean_r1", "i2t_r1", "t2i_r1"]:  # fmt: skip
        assert key in metrics, (name, key, sorted(metrics))
    for plot in plots:
        assert (tmp_path / "reports" / "plots" / plot).read_bytes().startswith(b"\x89PNG")
    register = out["register"]
    assert (register["metric"], register["version"], register["promoted"]) == (metric, 1, True)
    assert register["value"] == pytest.approx(metrics[metric])
    train = json.loads((tmp_path / "models" / "train_report.json").read_text())
    assert train["task"] == task and train["task_loss"] == "on"
    check = globals().get(f"_check_{name}")
    if check is not None:
        check(tmp_path, metrics, train)


def _check_multilabel_cnn_lstm(project: Path, metrics: dict, train: dict) -> None:
    manifest = json.loads((project / "data" / "shards" / "manifest.json").read_text())
    assert manifest["label_separator"] == "|" and manifest["multi_label_pairs"] > 0
    assert {"positive", "negative", "circle"} <= set(manifest["classes"])  # one class per tag
    per_class = json.loads((project / "reports" / "per_class.json").read_text())
    assert {r["class"] for r in per_class} == set(manifest["classes"]) and "ap" in per_class[0]
    report = (project / "reports" / "report.md").read_text()
    assert "| class | precision | recall | f1 | ap | support |" in report


def _check_vqa_lstm_resnet(project: Path, metrics: dict, train: dict) -> None:
    by_type = json.loads((project / "reports" / "per_question_type.json").read_text())
    assert by_type and {r["question_type"] for r in by_type} <= {
        "what colour", "how many", "is left of"}  # fmt: skip
    for row in by_type:
        slug = row["question_type"].replace(" ", "_")
        assert metrics[f"vqa_accuracy_{slug}"] == row["vqa_accuracy"]
    align = json.loads((project / "data" / "align" / "report.json").read_text())
    assert len(align["classes"]) <= 20  # align.top_k_labels: the train answer vocabulary


def _check_vilt_vqa(project: Path, metrics: dict, train: dict) -> None:
    """The single-stream model went through train, evaluate (its ablation beside the dual-
    encoder fusions) and predict's loader, rebuilt from its checkpoint alone."""
    from mmpipe.checkpoint import load_model, pick_checkpoint
    from mmpipe.model.fusion import SingleStreamFusion

    model, info = load_model(pick_checkpoint(project / "models"))
    assert isinstance(model.head, SingleStreamFusion)
    assert info["model_args"]["image_encoder"] == "patch"
    ablation = json.loads((project / "reports" / "ablation.json").read_text())
    rows = {r["fusion"] for r in ablation["results"]}
    assert {"cross_attention", "cross_attention_pooled", "single_stream"} <= rows


def _check_clip_pretrain_finetune(project: Path, metrics: dict, train: dict) -> None:
    assert [s["name"] for s in train["stages"]] == ["pretrain", "finetune"]
    assert [r["stage"] for r in train["history"]] == ["pretrain", "finetune"]
    assert train["history"][0]["train_task"] > 0  # measured, though its weight is 0
    assert train["stages"][1]["freezing"].startswith("image frozen")


def test_visual_entailment_two_text_columns_then_warm_start_from_the_champion(
    shared_data, tmp_path, capsys
):
    """SNLI-VE (premise + hypothesis columns, 3 classes) with no file edited, every night with
    train.init_from: champion. The first night has no champion: it starts cold and says so;
    the second and third fine-tune from the champion (then by the alias's model URI)."""
    source = [
        "ingest.source=folder", f"ingest.root={SHARED_DATA / 'visual-entailment-sample'}",
        "ingest.captions=pairs.csv", "ingest.text_columns=[premise, caption]",
        # 2 captioned images (15 pairs + 1): seed 2 puts the big one in train, the other in test
        "align.train=0.5", "align.val=0.0", "align.test=0.5", "align.seed=2",
        "evaluate.zero_shot_field=null",
    ]  # fmt: skip
    first = mmpipe_run(tmp_path, None, [*source, "train.init_from=champion"], capsys)
    assert first["train"]["init"] is None and first["register"]["version"] == 1
    installed = json.loads((tmp_path / "models" / "train_report.json").read_text())
    assert installed["init_from"].startswith("champion: none yet (first night)")
    assert first["align"]["classes"] == ["contradiction", "entailment", "neutral"]
    records = (tmp_path / "data" / "ingest" / "records.parquet").read_bytes()
    assert b"[SEP]" in records  # premise [SEP] hypothesis: one text input
    metrics, _ = _reports(tmp_path)
    assert "accuracy" in metrics and first["register"]["metric"] == "accuracy"
    second = mmpipe_run(tmp_path, None, [*source, "train.init_from=champion"], capsys)
    init = second["train"]["init"]
    assert init["loaded"] > 0 and init["skipped"] == [] and init["new"] == []
    assert init["source"].endswith(".pt") and second["register"]["version"] == 2
    # the same alias by its model URI
    uri = "train.init_from=models:/mmpipe-fusion@champion"
    third = mmpipe_run(tmp_path, None, [*source, uri], capsys)
    assert third["train"]["init"]["loaded"] == init["loaded"]
    assert third["register"]["version"] == 3


def test_train_help_says_how_warm_up_is_sized():
    from mmpipe.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["train"].format_help()
    assert "train.warmup_fraction = 0.05" in text and "capped at half" in text
    assert "train.stages = []" in text and "train.init_from = null" in text


def test_captioning_config_runs_to_a_registered_model_that_captions_an_image(tmp_path, capsys):
    """configs/captioning.yaml at smoke size: the decoder trains on the captions, evaluate writes
    BLEU-4/CIDEr beside the nearest-neighbour baseline and the report's examples, register
    compares cider, and `mmpipe caption IMG` prints a caption from the champion."""
    out = mmpipe_run(tmp_path, REPO / "configs" / "captioning.yaml", [], capsys)
    metrics, report = _reports(tmp_path)
    assert report["task"] == "captioning" and "task_metrics" not in report["skipped"]
    for key in ("bleu4", "cider", "nn_bleu4", "nn_cider", "mean_r1"):
        assert metrics[key] >= 0.0, key
    register = out["register"]
    assert (register["metric"], register["version"], register["promoted"]) == ("cider", 1, True)
    assert register["value"] == pytest.approx(metrics["cider"])
    examples = json.loads((tmp_path / "reports" / "examples" / "captions.json").read_text())
    assert examples and all(e["references"] for e in examples)
    assert (
        "Captioning (beam search vs the nearest train caption)"
        in (tmp_path / "reports" / "report.md").read_text()
    )
    image = next(p for p in sorted((tmp_path / "data").rglob("*")) if p.suffix in (".png", ".jpg"))
    capsys.readouterr()
    argv = ["caption", str(image), "--beam", "2", "--project-dir", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    printed = json.loads(capsys.readouterr().out)
    from mmpipe.checkpoint import load_model, pick_checkpoint

    vocab = set(load_model(pick_checkpoint(tmp_path / "models"))[1]["caption"]["vocab"])
    assert printed["beam"] == 2 and printed["caption"]
    assert set(printed["caption"].split()) <= vocab


def test_captioning_runs_on_an_unlabelled_real_sample(shared_data, tmp_path, capsys):
    """coco-mini without its labels file: captioning needs none and registers on cider."""
    source = ["ingest.source=coco", f"ingest.root={SHARED_DATA / 'coco-mini'}",
              "ingest.captions=captions.json", "ingest.labels_file=null",
              "train.task=captioning"]  # fmt: skip
    out = mmpipe_run(tmp_path, None, source, capsys)
    metrics, report = _reports(tmp_path)
    assert report["task"] == "captioning" and report["labels"] == "none"
    assert report["skipped"]["ablation"].startswith("captioning has a caption decoder")
    assert out["register"]["metric"] == "cider" and out["register"]["promoted"]
    assert metrics["n_caption_images"] == metrics["n_test_images"] >= 2
