"""run_evaluate on tiny hand-written WebDataset shards and a tiny random model.

`contract_stack` provides the modules evaluate/predict call (mmpipe.data, mmpipe.train,
mmpipe.shard, mmpipe.model) as small stand-ins that follow CONTRACT.md, so these tests pin
evaluate's own logic; when the real modules exist they are used instead (see the fixture).
"""

from __future__ import annotations

import importlib
import io
import json
import sys
import tarfile
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

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
IMAGE_SIZE = 16


# ----------------------------------------------------------------- contract stand-ins


def preprocess_image(img: Image.Image, image_size: int, quality: int = 90) -> bytes:
    """As shard: EXIF transpose, RGB, square resize, JPEG bytes."""
    img = ImageOps.exif_transpose(img).convert("RGB").resize((image_size, image_size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_image(data: bytes) -> torch.Tensor:
    """As the loader: [0, 1] then (x - 0.5) / 0.5, (3, H, W)."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5


class TinyModel(torch.nn.Module):
    """encode_image / encode_text / forward / features as in CONTRACT.md, hashing tokenizer."""

    def __init__(self, num_classes: int = 2, dim: int = 8, vocab: int = 64):
        super().__init__()
        self.vocab = vocab
        self.image = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, dim)
        )
        self.text = torch.nn.EmbeddingBag(vocab, dim)
        self.head = torch.nn.Linear(2 * dim, num_classes)

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [zlib.crc32(w.encode()) % (self.vocab - 2) + 2 for w in t.lower().split()] or [1]
        return torch.tensor(ids), torch.tensor(offsets)

    def features(self, images, texts):
        return self.image(images), self.text(*self._tokens(list(texts)))

    def encode_image(self, images):
        return torch.nn.functional.normalize(self.image(images), dim=-1)

    def encode_text(self, texts):
        return torch.nn.functional.normalize(self.text(*self._tokens(list(texts))), dim=-1)

    def forward(self, images, texts):
        fi, ft = self.features(images, texts)
        return {
            "image_emb": torch.nn.functional.normalize(fi, dim=-1),
            "text_emb": torch.nn.functional.normalize(ft, dim=-1),
            "logit_scale": torch.tensor(10.0),
            "logits": self.head(torch.cat([fi, ft], dim=-1)),
        }


def save_checkpoint(model: TinyModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "num_classes": 2, "classes": CLASSES}, path)
    return path


def load_model(checkpoint):
    state = torch.load(checkpoint, weights_only=True)
    model = TinyModel(state["num_classes"])
    model.load_state_dict(state["model"])
    return model.eval(), {"classes": state["classes"]}


def create_dataloader(shard_dir, split, batch_size, *, shuffle_buffer=0, **_):
    samples = []
    for tar in sorted(Path(shard_dir).glob(f"{split}-*.tar")):
        with tarfile.open(tar) as tf:
            members: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(m).read()
        samples += [(k, v) for k, v in sorted(members.items())]
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        meta = [json.loads(v["json"]) for _, v in chunk]
        yield {
            "image": torch.stack([decode_image(v["jpg"]) for _, v in chunk]),
            "text": [v["txt"].decode() for _, v in chunk],
            "label": torch.tensor([m["label_index"] for m in meta]),
            "key": [k for k, _ in chunk],
            "image_id": [m["image_id"] for m in meta],
            "caption_id": [m["caption_id"] for m in meta],
            "meta": [m["meta"] for m in meta],
        }


class _Head(torch.nn.Module):
    def __init__(self, mode: str, di: int, dt: int, n: int):
        super().__init__()
        self.mode = mode
        self.lin = torch.nn.Linear({"image_only": di, "text_only": dt}.get(mode, di + dt), n)

    def forward(self, xi, xt):
        x = {"image_only": xi, "text_only": xt}.get(self.mode)
        return self.lin(torch.cat([xi, xt], -1) if x is None else x)


def create_fusion_head(mode, image_dim, text_dim, train_params, num_classes):
    return _Head(mode, image_dim, text_dim, num_classes)


def _stand_ins() -> dict[str, types.ModuleType]:
    mods = {}
    for name, attrs in {
        "mmpipe.shard": {"preprocess_image": preprocess_image},
        "mmpipe.data": {"decode_image": decode_image, "create_dataloader": create_dataloader},
        "mmpipe.train": {"load_model": load_model},
        "mmpipe.model": {"create_fusion_head": create_fusion_head},
    }.items():
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mods[name] = mod
    return mods


@pytest.fixture
def contract_stack(monkeypatch):
    """Stand-ins for the modules other engineers own, unless all the real ones import."""
    try:
        for name in ("mmpipe.shard", "mmpipe.data", "mmpipe.train", "mmpipe.model"):
            importlib.import_module(name)
        real = all(
            hasattr(sys.modules[m], a)
            for m, a in [
                ("mmpipe.shard", "preprocess_image"),
                ("mmpipe.data", "decode_image"),
                ("mmpipe.model", "create_fusion_head"),
            ]
        )
    except ImportError:
        real = False
    if not real:
        for name, mod in _stand_ins().items():
            monkeypatch.setitem(sys.modules, name, mod)
    return types.SimpleNamespace(save_checkpoint=save_checkpoint, TinyModel=TinyModel)


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
