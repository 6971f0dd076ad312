"""run_evaluate on tiny hand-written WebDataset shards and a tiny random model.

The model is a real, randomly initialised tiny one saved in train's checkpoint format, so
these tests pin evaluate's own logic (metrics, files, determinism) independent of training.
"""

from __future__ import annotations

import io
import json
import tarfile
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmpipe.config import EvaluateParams, TrainParams
from mmpipe.io import read_json, write_json_atomic

CLASSES = ["cool", "warm"]
COLOURS = {
    "red": (220, 40, 30),
    "orange": (240, 150, 20),
    "blue": (30, 60, 220),
    "teal": (20, 160, 170),
}
WARM = {"red", "orange"}
SHAPES = ["circle", "square"]
IMAGE_SIZE = 32


# ----------------------------------------------------------------- a tiny real model

# the smallest real configuration: scratch CNN + biLSTM, 8-wide, trained by nobody (random init)
TINY_TRAIN = TrainParams(image_encoder="cnn", text_encoder="lstm", width=8, embed_dim=8,
                         head_hidden=8, vocab_size=64, max_tokens=8)


def preprocess_image(img: Image.Image, image_size: int, quality: int = 90) -> bytes:
    """What shard stores: the real preprocessing."""
    from mmpipe.shard import preprocess_image as real

    return real(img, image_size, quality)


class _Stack(types.SimpleNamespace):
    """Builds real random-init models and checkpoints in the format train writes."""

    @staticmethod
    def TinyModel(p: TrainParams = TINY_TRAIN):  # noqa: N802 (reads like the class it makes)
        from mmpipe.model import create_model

        return create_model(p, len(CLASSES))

    @staticmethod
    def save_checkpoint(model, path: Path, p: TrainParams = TINY_TRAIN) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "model": model.state_dict(),
                "params": p.model_dump(mode="json"),
                "num_classes": len(CLASSES),
                "classes": CLASSES,
                "image_size": IMAGE_SIZE,
                "task": p.task,
            },
            path,
        )
        return path


@pytest.fixture
def contract_stack():
    """The real model factory + the checkpoint format of mmpipe.train."""
    return _Stack()


# ----------------------------------------------------------------- tiny shards


def _image(colour: str, shape: str) -> Image.Image:
    img = Image.new("RGB", (24, 24), (245, 245, 245))
    px = img.load()
    for y in range(4, 20):
        for x in range(4, 20):
            if shape == "square" or (x - 12) ** 2 + (y - 12) ** 2 < 64:
                px[x, y] = COLOURS[colour]
    return img


def write_shards(root: Path, n_images: dict[str, int] | None = None, captions: int = 2) -> Path:
    """{split}-000000.tar + manifest.json, one sample per (image, caption), keys sorted."""
    n_images = n_images or {"train": 12, "test": 8}
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in n_images.items():
        count = 0
        with tarfile.open(root / f"{split}-000000.tar", "w") as tf:
            for i in range(n):
                colour = list(COLOURS)[i % 4]
                shape = SHAPES[(i // 4) % 2]
                jpg = preprocess_image(_image(colour, shape), IMAGE_SIZE)
                for c in range(captions):
                    words = [f"a {colour} {shape}", f"one {shape} coloured {colour} here"]
                    key = f"{split}{i:03d}c{c}"
                    meta = {
                        "pair_id": key,
                        "image_id": f"{split}img{i:03d}",
                        "caption_id": key,
                        "label": "warm" if colour in WARM else "cool",
                        "label_index": int(colour in WARM),
                        "split": split,
                        "meta": {"main_shape": shape},
                        "copy": 0,
                    }
                    for ext, data in (
                        ("jpg", jpg),
                        ("txt", words[c % 2].encode()),
                        ("json", json.dumps(meta).encode()),
                    ):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
                    count += 1
        splits[split] = {
            "count": count,
            "shards": [{"name": f"{split}-000000.tar", "count": count}],
        }
    write_json_atomic(
        root / "manifest.json",
        {"image_size": IMAGE_SIZE, "classes": CLASSES, "splits": splits, "params_hash": "x"},
    )
    return root


@pytest.fixture
def project(tmp_path, contract_stack):
    """tmp project: data/shards with train + test, models/best.pt of a random tiny model."""
    torch.manual_seed(0)
    shards = write_shards(tmp_path / "data" / "shards")
    contract_stack.save_checkpoint(contract_stack.TinyModel(), tmp_path / "models" / "best.pt")
    return types.SimpleNamespace(root=tmp_path, shards=shards, models=tmp_path / "models")


# ----------------------------------------------------------------- tests


def _params(**kw) -> EvaluateParams:
    return EvaluateParams(batch_size=5, ks=[1, 5, 100], ablation_epochs=3, **kw)


def test_evaluate_writes_metrics_plots_and_report(project):
    from mmpipe.evaluate import ABLATION_MODES, run_evaluate

    out = project.root / "reports"
    metrics = run_evaluate(
        project.shards, project.models, _params(), out, train_params=TrainParams()
    )
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
    png = (out / "plots" / "confusion_matrix.png").read_bytes()
    assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > 100
    rows = read_json(out / "plots" / "recall_at_k.json")
    assert {(r["k"], r["direction"]) for r in rows} == {
        (k, d) for k in (1, 5, 100) for d in ("i2t", "t2i")
    }
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
    report = (out / "report.md").read_text()
    assert "| accuracy |" in report and "plots/confusion_matrix.png" in report
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


def test_evaluate_without_ablation_and_missing_inputs(project, tmp_path):
    from mmpipe.errors import InputError
    from mmpipe.evaluate import run_evaluate

    m = run_evaluate(project.shards, project.models, _params(ablation=False), tmp_path / "r")
    assert "fusion_gain" not in m and read_json(tmp_path / "r" / "ablation.json")["results"] == []
    with pytest.raises(InputError, match="best.pt or last.pt"):
        run_evaluate(project.shards, tmp_path / "nomodels", _params(), tmp_path / "r2")
    with pytest.raises(InputError, match="manifest.json"):
        run_evaluate(tmp_path / "noshards", project.models, _params(), tmp_path / "r3")


def test_evaluate_falls_back_to_last_checkpoint(project, tmp_path):
    from mmpipe.evaluate import run_evaluate

    (project.models / "best.pt").rename(project.models / "last.pt")
    run_evaluate(project.shards, project.models, _params(ablation=False), tmp_path / "r")
    assert read_json(tmp_path / "r" / "evaluation_report.json")["checkpoint"].endswith("last.pt")
