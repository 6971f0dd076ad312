"""The champion served by `mlflow models serve` as a user runs it, on 127.0.0.1.

One good request (a COCO photo for a model trained on generated shapes: answered, with the
out-of-distribution warning) and three bad ones (a path on the server, /etc/passwd, bytes that are
not an image): each a 400 of one line, no stack trace, nothing read from the server's disk.

The fresh-venv test installs only the model's own requirements into a new venv (PyPI + the local
CPU torch wheel, minutes) and loads the model there, outside the repo: opt in with
MMPIPE_TEST_FRESH_VENV=1.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mmpipe import services
from mmpipe.cli import main
from tests.conftest import SHARED_DATA, TINY_OVERRIDES
from tests.servers import free_port

pytestmark = pytest.mark.slow

CHAMPION = "models:/mmpipe-fusion@champion"


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny synthetic project whose model is the registry's champion (96 images: enough
    validation images for the out-of-distribution profile)."""
    root = tmp_path_factory.mktemp("serving") / "proj"
    root.mkdir()
    (root / "params.yaml").write_text("{}\n")
    argv = ["run", "--project-dir", str(root)]
    for o in [*TINY_OVERRIDES, "ingest.synthetic.n_images=96"]:
        argv += ["--set", o]
    assert main(argv) == 0
    return root


def _server_env(project: Path) -> dict[str, str]:
    """The server sees the store, not the repo: no PYTHONPATH, so mmpipe's code is the model's;
    the venv's bin/ on PATH, as an activated venv has it (the server execs `uvicorn`)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env | {
        "PATH": path,
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}",
    }


def _post(url: str, frame: dict) -> tuple[int, str]:
    body = json.dumps({"dataframe_split": frame}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _frame(image: str, caption: str = "a red circle") -> dict:
    return {"columns": ["image", "caption"], "data": [[image, caption]]}


def test_mlflow_models_serve_answers_one_good_and_three_bad_requests(project, tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", CHAMPION,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = services.start_server(
        cmd, name="mlflow models serve", health_url=f"http://127.0.0.1:{port}/ping",
        log_file=tmp_path / "serve.log", env=_server_env(project), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/invocations"
        photo = next((SHARED_DATA / "coco-mini" / "images").glob("*.jpg"))
        status, body = _post(url, _frame(base64.b64encode(photo.read_bytes()).decode()))
        assert status == 200, body
        [row] = _strict(body)["predictions"]
        assert set(row) == {"label", "label_index", "confidence", "similarity", "warnings"}
        assert any("out of the training distribution" in w for w in row["warnings"]), row

        not_an_image = base64.b64encode(b"not an image at all").decode()
        bad = {
            str(photo): "row 0: image is not base64 data",  # a photo on the server's disk
            "/etc/passwd": "row 0: image is not base64 data",
            not_an_image: "row 0: <bytes>: not a readable image",
        }
        for image, message in bad.items():
            status, body = _post(url, _frame(image))
            assert status == 400, body
            assert "\n" not in body.strip() and "Traceback" not in body and "root:" not in body
            error = _strict(body)
            assert set(error) == {"error_code", "message"} and error["message"].startswith(message)
    finally:
        services.stop_group(proc)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log  # bad input is the client's error, not a crash


@pytest.mark.skipif(
    os.environ.get("MMPIPE_TEST_FRESH_VENV") != "1",
    reason="installs the model's requirements into a new venv (minutes, needs PyPI): "
    "MMPIPE_TEST_FRESH_VENV=1 runs it",
)
def test_the_champion_loads_and_predicts_in_a_fresh_venv_without_the_repo(project, tmp_path):
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = _server_env(project)["MLFLOW_TRACKING_URI"]
    try:
        model = Path(mlflow.artifacts.download_artifacts(CHAMPION, dst_path=str(tmp_path / "m")))
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(model / "requirements.txt")], check=True, timeout=1500)
    script = (
        "import json, sys, mlflow\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import mmpipe; assert mmpipe.__file__.startswith(sys.argv[1]), mmpipe.__file__\n"
        "example = json.load(open(sys.argv[1] + '/serving_input_example.json'))\n"
        "import pandas as pd\n"
        "frame = pd.DataFrame(**example['dataframe_split'])\n"
        "print(m.predict(frame).to_json(orient='records'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", script, str(model)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    [row] = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["warnings"] == [] and row["label"]  # a training sample: in distribution
