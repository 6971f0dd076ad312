"""Predictor: preprocessing parity with the shards, search, classification, MLflow round trip."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from mmpipe import predict, tracking
from mmpipe.config import RegisterParams, TrackingParams
from mmpipe.errors import InputError
from mmpipe.layout import Layout
from tests.conftest import COLOUR_CLASSES as CLASSES
from tests.conftest import COLOUR_IMAGE_SIZE as IMAGE_SIZE
from tests.conftest import colour_image, save_random_checkpoint, write_colour_shards


@pytest.fixture
def proj(tmp_path, monkeypatch):
    """Project with shards (manifest gives image size + classes), a checkpoint and 4 image files."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    torch.manual_seed(0)
    write_colour_shards(tmp_path / "data" / "shards", {"test": 4}, captions=1)
    ckpt = save_random_checkpoint(tmp_path / "models" / "best.pt")
    images = []
    for colour, shape in [
        ("red", "circle"),
        ("blue", "square"),
        ("teal", "circle"),
        ("orange", "square"),
    ]:
        path = tmp_path / f"{colour}_{shape}.png"
        colour_image(colour, shape).rotate(90).save(path)
        images.append(path)
    yield tmp_path, ckpt, images
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_preprocessing_matches_the_shard_path(proj):
    root, ckpt, images = proj
    from mmpipe.data import decode_image
    from mmpipe.shard import preprocess_image

    p = predict.load_predictor(ckpt, shard_dir=root / "data" / "shards")
    assert p.image_size == IMAGE_SIZE and p.classes == CLASSES
    expected = decode_image(preprocess_image(Image.open(images[0]), IMAGE_SIZE))
    got = p.load_images([images[0]])[0]
    assert got.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(got, expected)
    # bytes and PIL input go through the same path
    torch.testing.assert_close(p.load_images([images[0].read_bytes()])[0], expected)


def test_a_large_photo_is_decoded_at_the_same_reduced_scale_as_in_shard(proj, shared_data):
    from mmpipe.data import decode_image
    from mmpipe.shard import preprocess_image

    root, ckpt, _ = proj
    photo = next((shared_data / "coco-mini" / "images").glob("*.jpg"))  # 640 px: JPEG draft applies
    p = predict.load_predictor(ckpt, shard_dir=root / "data" / "shards")
    with Image.open(photo) as opened:  # as shard does: opened, not loaded, then preprocessed
        stored = decode_image(preprocess_image(opened, IMAGE_SIZE))
    torch.testing.assert_close(p.load_images([photo])[0], stored, rtol=0, atol=0)
    torch.testing.assert_close(p.load_images([photo.read_bytes()])[0], stored, rtol=0, atol=0)


def test_search_and_classify(proj):
    root, ckpt, images = proj
    p = predict.load_predictor(ckpt, shard_dir=root / "data" / "shards")
    captions = ["a red circle", "a blue square", "a teal circle"]
    hits = p.search_captions(images[0], captions, k=2)
    scores = (p.embed_images([images[0]]) @ p.embed_captions(captions).T)[0]
    assert [h["rank"] for h in hits] == [1, 2]
    assert hits[0]["index"] == int(scores.argmax()) and hits[0]["score"] >= hits[1]["score"]
    assert hits[0]["caption"] == captions[hits[0]["index"]]
    found = p.search_images("a red circle", images, k=10)
    assert len(found) == 4 and sorted(h["index"] for h in found) == [0, 1, 2, 3]
    out = p.classify_pair(images[1], "a blue square")
    assert out["label"] in CLASSES and out["label"] == CLASSES[out["label_index"]]
    assert sum(out["probabilities"].values()) == pytest.approx(1.0)
    assert out["confidence"] == pytest.approx(max(out["probabilities"].values()))
    assert -1.0 <= out["similarity"] <= 1.0
    with pytest.raises(InputError, match="not found"):
        p.classify_pair(root / "missing.jpg", "x")
    with pytest.raises(InputError, match="not a readable image"):
        (root / "bad.jpg").write_bytes(b"not an image")
        p.classify_pair(root / "bad.jpg", "x")


def test_decode_logits_tasks():
    rows = predict.decode_logits(torch.tensor([[0.0, 2.0], [3.0, 0.0]]), "multiclass", ["a", "b"])
    assert [r["label"] for r in rows] == ["b", "a"]
    rows = predict.decode_logits(torch.tensor([[2.0], [-2.0]]), "binary", ["neg", "pos"])
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert rows[0]["confidence"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    rows = predict.decode_logits(torch.tensor([[2.0, -1.0, 0.5]]), "multilabel", ["a", "b", "c"])
    assert (rows[0]["label"], rows[0]["labels"], rows[0]["label_index"]) == ("a|c", ["a", "c"], 0)
    rows = predict.decode_logits(torch.tensor([[0.1, 3.0]]), "vqa", ["2", "red"])
    assert rows[0]["label"] == "red"
    rows = predict.decode_logits(torch.tensor([[0.3]]), "regression", [])
    assert rows[0]["value"] == pytest.approx(0.3)
    # a model trained without labels (retrieval only) has no task prediction, and says so
    rows = predict.decode_logits(torch.tensor([[0.3]]), "multiclass", [])
    assert rows[0]["label"] == "" and "without labels" in rows[0]["note"]


@pytest.mark.parametrize("size", [32, 96, 128, 224])
def test_register_at_every_image_size(proj, size):
    """The logged model at any image size serves what the predictor answers: at 96 and 128 a
    255+ character base64 run without '/' once made `Path(...).is_file()` raise 'File name too
    long' inside the signature inference, so register crashed."""
    from mmpipe.serving import example_frame, predict_rows

    root, ckpt, images = proj
    store = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
    predictor = predict.load_predictor(ckpt, image_size=size)
    with tracking.start_run(store, root, run_name="train") as run:
        pass
    uri = tracking.log_model(run, predictor, example=example_frame(root / "data" / "shards"))
    result = tracking.register_and_maybe_promote(run, uri, {"accuracy": 0.5}, RegisterParams())
    assert result["version"] == 1 and result["promoted"]
    loaded = tracking.load_pyfunc(uri)
    frame = _frame(images)
    pd.testing.assert_frame_equal(loaded.predict(frame), predict_rows(predictor, frame))
    cell = base64.b64encode(b"\xff" * 900).decode()  # 1200 chars of '/': every segment short
    long_run = base64.b64encode(bytes(range(256)) * 3).decode().replace("/", "+")
    for text in (cell, long_run):
        assert predict._image_from_cell(text, 0) == base64.b64decode(text)


def _frame(images) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image": [base64.b64encode(p.read_bytes()).decode() for p in images],
            "caption": ["a red circle", "a blue square", "a teal circle", "an orange square"],
        }
    )


def _load(source, root, store=None):
    """What `mmpipe predict --model SOURCE` does: resolve the source, then build the predictor."""
    layout = Layout(root)
    checkpoint, sidecar = tracking.resolve_model(source, store, RegisterParams(), layout)
    return predict.load_predictor(checkpoint, sidecar=sidecar, shard_dir=layout.shard_dir)


def test_logged_model_reloads_and_predicts_the_same(proj, monkeypatch):
    root, ckpt, images = proj
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")  # nothing may need pickle
    store = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
    from mmpipe.serving import example_frame, predict_rows

    direct_predictor = predict.load_predictor(ckpt, shard_dir=root / "data" / "shards")
    direct = direct_predictor.predict_frame(_frame(images))
    with tracking.start_run(store, root, run_name="train") as run:
        pass
    example = example_frame(root / "data" / "shards")
    uri = tracking.log_model(run, direct_predictor, example=example)
    loaded = tracking.load_pyfunc(uri)
    assert loaded.metadata.signature is not None
    assert [c.name for c in loaded.metadata.signature.inputs] == ["image", "caption"]
    served = predict_rows(direct_predictor, _frame(images))
    pd.testing.assert_frame_equal(loaded.predict(_frame(images)), served)

    # registered as champion, the default source resolves through the registry
    result = tracking.register_and_maybe_promote(run, uri, {"accuracy": 0.5}, RegisterParams())
    assert result["promoted"]
    (root / "models" / "best.pt").unlink()  # proves the checkpoint came from MLflow
    p = _load(None, root, store)
    assert p.source != str(ckpt) and p.classes == CLASSES
    pd.testing.assert_frame_equal(p.predict_frame(_frame(images)), direct)
    p2 = _load("models:/mmpipe-fusion@champion", root, store)
    pd.testing.assert_frame_equal(p2.predict_frame(_frame(images)), direct)


def test_default_source_falls_back_to_checkpoint_without_registry(proj):
    root, ckpt, _ = proj
    p = _load(None, root)  # default sqlite DB does not exist
    assert p.source == str(ckpt)
    assert not (root / ".mmpipe" / "mlflow.db").exists()  # not created as a side effect
    with pytest.raises(InputError, match="no best.pt"):
        predict.load_predictor(root / "data")


def _register(root, store, register, accuracy):
    """What the register stage does, on the project's trained model (pipeline.stage_register)."""
    from mmpipe import pipeline
    from mmpipe.checkpoint import pick_checkpoint
    from mmpipe.config import Params
    from mmpipe.evaluate import provenance
    from mmpipe.io import read_json, write_json_atomic

    layout = Layout(root)
    scored = provenance(pick_checkpoint(layout.model_dir), layout.shard_dir)  # as evaluate does
    if pipeline._train_run_id(layout) is None:
        with tracking.start_run(store, root, run_name="train") as run:
            pass
        pipeline.record_train_run(layout, run.id)
    report_path = layout.model_dir / "train_report.json"
    report = read_json(report_path) if report_path.is_file() else {}
    if report.get("data_hash") != scored["data_sha256"]:  # as stage_train installs it
        write_json_atomic(report_path, {**report, "data_hash": scored["data_sha256"]})
    metrics = {"accuracy": accuracy}  # numbers only; what they scored is evaluate's report
    write_json_atomic(root / "reports" / "metrics.json", metrics)
    write_json_atomic(
        root / "reports" / "evaluation_report.json", {"metrics": metrics, "scored": scored}
    )
    params = Params(tracking=store, register=register)
    return pipeline.stage_register(params, Layout(root))


def test_champion_follows_the_register_params(proj):
    """`mmpipe predict` asks the registry for register.model_name@register.alias, not defaults."""
    root, ckpt, images = proj
    store = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
    custom = RegisterParams(model_name="my-model", alias="best")
    _register(root, store, custom, 0.5)
    (root / "models" / "best.pt").unlink()
    layout = Layout(root)
    checkpoint, sidecar = tracking.resolve_model(None, store, custom, layout)
    assert sidecar["classes"] == CLASSES and checkpoint.is_file()
    with pytest.raises(InputError, match="no best.pt"):  # the default name finds no champion
        tracking.resolve_model(None, store, RegisterParams(), layout)


def test_frame_rejects_bad_input(proj):
    root, ckpt, _ = proj
    p = predict.load_predictor(ckpt, shard_dir=root / "data" / "shards")
    with pytest.raises(InputError, match="caption"):
        p.predict_frame(pd.DataFrame({"image": ["x"]}))
    with pytest.raises(InputError, match="row 0"):
        p.predict_frame(pd.DataFrame({"image": ["%%%"], "caption": ["x"]}))
    buf = io.BytesIO()
    Image.new("RGB", (5, 5)).save(buf, format="PNG")
    assert len(p.predict_frame(pd.DataFrame({"image": [buf.getvalue()], "caption": ["x"]}))) == 1


def test_register_stage_versions_and_promotes_only_a_better_model(proj):
    root, ckpt, images = proj
    store = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
    first = _register(root, store, RegisterParams(), 0.6)
    second = _register(root, store, RegisterParams(), 0.4)
    assert (first["version"], first["promoted"]) == (1, True)
    assert (second["version"], second["promoted"], second["champion_version"]) == (2, False, 1)
    # image size + classes came from the project's manifest into the logged sidecar
    _, sidecar = tracking.download_model(second["model_uri"], store, root)
    training = sidecar.pop("training")  # what predict prints the model was trained on
    assert sidecar == {
        "image_size": IMAGE_SIZE,
        "decode": "reduced",
        "classes": CLASSES,
        "task": "multiclass",
    }
    assert training["classes"] == CLASSES and len(training["data_hash"]) == 64


def test_caption_command_refuses_a_model_that_is_not_a_captioning_model(proj, capsys):
    from mmpipe.cli import main

    root, ckpt, images = proj
    argv = ["caption", str(images[0]), "--model", str(ckpt), "--project-dir", str(root)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "a multiclass model has no caption decoder" in err and "train.task=captioning" in err


def test_a_model_trained_on_full_decode_shards_preprocesses_at_full_resolution(proj, shared_data):
    """shard.decode travels manifest -> checkpoint -> predictor: a photo is preprocessed the way
    the model's shards were written, not by the default."""
    from mmpipe.data import decode_image
    from mmpipe.shard import preprocess_image

    _, ckpt, _ = proj
    assert predict.load_predictor(ckpt).decode == "reduced"  # nothing recorded: the default
    state = torch.load(ckpt, weights_only=True)
    state["decode"] = "full"  # as train records a full-decode manifest's shard.decode
    full_ckpt = ckpt.parent / "full.pt"
    torch.save(state, full_ckpt)
    p = predict.load_predictor(full_ckpt)
    assert p.decode == "full" and p.describe()["decode"] == "full"
    photo = next((shared_data / "coco-mini" / "images").glob("*.jpg"))
    with Image.open(photo) as opened:
        full = decode_image(preprocess_image(opened, IMAGE_SIZE, decode="full"))
    with Image.open(photo) as opened:
        reduced = decode_image(preprocess_image(opened, IMAGE_SIZE))
    got = p.load_images([photo])[0]
    torch.testing.assert_close(got, full, rtol=0, atol=0)
    assert not torch.equal(got, reduced)


def _strict_json(text: str):
    """json.loads that rejects NaN / Infinity, as every JSON parser but Python's does."""
    import json

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_predict_of_a_model_without_task_labels_prints_valid_json(proj, capsys):
    """coco-mini unlabelled: `mmpipe predict` printed "confidence": NaN, which is not JSON."""
    from mmpipe.cli import main

    root, _, images = proj
    ckpt = save_random_checkpoint(root / "unlabelled" / "best.pt", classes=[])
    outside = root / "elsewhere"  # no shard manifest to take class names from
    outside.mkdir()
    argv = ["predict", str(images[0]), "a red circle", "--model", str(ckpt)]
    assert main([*argv, "--project-dir", str(outside)]) == 0
    out = _strict_json(capsys.readouterr().out)
    assert out["confidence"] is None and "without labels" in out["note"]
    regression = predict.decode_logits(torch.tensor([[0.3]]), "regression", [])
    assert regression[0]["confidence"] is None
