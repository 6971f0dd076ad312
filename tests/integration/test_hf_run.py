"""A pretrained Hugging Face dual encoder through `mmpipe run` as a user runs it: train with a
locked image tower (frozen-feature cache) and SigLIP's loss -> evaluate -> register -> predict,
resume, zero training steps, the registered model's pyfunc, and `mmpipe eval-retrieval`."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest

from mmpipe.cli import main
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _run(project: Path, overrides: list[str], capsys, command: str = "run") -> dict:
    params = project / "params.yaml"
    if not params.exists():
        project.mkdir(parents=True, exist_ok=True)
        params.write_text("{}\n")
    argv = [command, "--project-dir", str(project), "--params", str(params)]
    for o in [*TINY_OVERRIDES, *overrides]:
        argv += ["--set", o]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    return json.loads(capsys.readouterr().out)


def test_pretrained_siglip_locked_image_tower_runs_end_to_end(tiny_hf, tmp_path, capsys):
    model_dir = tmp_path / "siglip"
    shutil.copytree(tiny_hf["siglip"], model_dir)
    settings = [f"train.pretrained=hf:{model_dir}", "train.contrastive_loss=sigmoid",
                "train.freeze_image=true", "train.encoder_lr_scale=0.1", "train.epochs=2"]  # fmt: skip
    out = _run(tmp_path / "p", settings, capsys)
    report = out["train"]
    assert report["model"]["contrastive_loss"] == "sigmoid"
    cache = list((tmp_path / "p" / ".mmpipe" / "feature-cache").rglob("*.pt"))
    assert cache, "a locked tower's features are cached"
    metrics = json.loads((tmp_path / "p" / "reports" / "metrics.json").read_text())
    assert 0.0 <= metrics["i2t_r1"] <= 1.0
    assert out["register"]["version"] == 1

    # a second run with the same shards and tower reuses the cached features
    stamp = {p: p.stat().st_mtime_ns for p in cache}
    _run(tmp_path / "p", settings, capsys, command="train")
    assert {p: p.stat().st_mtime_ns for p in cache} == stamp

    # the registered model predicts without the directory it was trained from
    shutil.rmtree(model_dir)
    image = next((tmp_path / "p" / "data" / "ingest" / "source" / "images").glob("*.jpg"))
    capsys.readouterr()
    argv = ["predict", str(image), "a red circle", "--project-dir", str(tmp_path / "p")]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "similarity" in json.loads(capsys.readouterr().out)
    from mmpipe import tracking
    from mmpipe.config import TrackingParams

    store = TrackingParams(uri=f"sqlite:///{tmp_path / 'p' / '.mmpipe' / 'mlflow.db'}")
    tracking.store.point_fluent_api_at(tracking.store.connect(store, tmp_path / "p"))
    loaded = tracking.load_pyfunc("models:/mmpipe-fusion@champion")
    frame = pd.DataFrame({"image": [base64.b64encode(image.read_bytes()).decode()],
                          "caption": ["a red circle"]})  # fmt: skip
    assert len(loaded.predict(frame)) == 1


def test_resume_a_pretrained_clip_run(tiny_hf, tmp_path, capsys):
    settings = [f"train.pretrained=hf:{tiny_hf['clip']}", "train.freeze_text=true",
                "train.epochs=2", "train.unfreeze_last=1"]  # fmt: skip
    project = tmp_path / "p"
    for stage in ("ingest", "curate", "align", "shard"):
        _run(project, settings, capsys, command=stage)
    argv = ["train", "--project-dir", str(project), "--params", str(project / "params.yaml")]
    for o in [*TINY_OVERRIDES, *settings]:
        argv += ["--set", o]
    # stop after the first step through the test hook, then resume to the end
    from mmpipe import train

    real = train.optimizer_step
    calls = []

    def stop_after_one(t):
        real(t)
        calls.append(1)
        if len(calls) == 1:  # what `kill` does: a flag, then the checkpoint at a step boundary
            os.kill(os.getpid(), signal.SIGTERM)

    train.optimizer_step = stop_after_one
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(argv) == 143
    finally:
        train.optimizer_step = real
        signal.signal(signal.SIGTERM, before)
    assert (project / "models.partial" / "last.pt").is_file()
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err[-2000:]
    report = json.loads((project / "models" / "train_report.json").read_text())
    assert report["epochs_completed"] == 2


def test_zero_steps_gives_the_pretrained_zero_shot_model(tiny_hf, tmp_path, capsys):
    out = _run(tmp_path / "p", [f"train.pretrained=hf:{tiny_hf['clip']}", "train.epochs=0"], capsys)
    assert out["train"]["steps"] == 0
    metrics = json.loads((tmp_path / "p" / "reports" / "metrics.json").read_text())
    assert "mean_r1" in metrics


def test_eval_retrieval_scores_a_folder_collection(tiny_hf, shared_data, tmp_path, capsys):
    root = shared_data / "flickr30k-sample"
    for model in (f"hf:{tiny_hf['clip']}",):
        capsys.readouterr()
        argv = ["eval-retrieval", str(root), "--captions", "captions.jsonl", "--model", model,
                "--json", str(tmp_path / "r.json")]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err[-2000:]
        result = json.loads(capsys.readouterr().out)
        assert result == json.loads((tmp_path / "r.json").read_text())
        assert result["captions"] == 25 and result["images"] == 5
        assert result["chance"]["t2i"]["R@1"] == pytest.approx(1 / 5)
        for way in ("i2t", "t2i"):
            assert set(result[way]) == {"R@1", "R@5", "R@10"}
