"""`mmpipe ui` in a real browser: headless Debian Chromium (Playwright) against the MLflow UI.

Builds a project-like store (<tmp>/.mmpipe/mlflow.db + mlartifacts) with one run in experiment
"mmpipe" and a registered "mmpipe-fusion" version aliased "champion", starts the UI through
mmpipe.ui.serve_ui, and checks what a training user must see: the runs table (not the GenAI
traces overview) with the run's metric, and the champion alias on the model page. Screenshots go
to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from mmpipe import ui

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method"),
]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
RUN_NAME = "nightly-browser-check"
ACCURACY = 0.8125


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):  # CI must have installed it (.ci/install-browser.sh)
        pytest.fail(f"{CHROMIUM} missing under CI: .ci/install-browser.sh did not install it")
    pytest.skip(f"{CHROMIUM} missing (apt-get install chromium, or bash .ci/install-browser.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, str]:
    """A project dir whose MLflow store holds one run + a champion model version."""
    import mlflow
    from mlflow import MlflowClient

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    project = tmp_path_factory.mktemp("ui-project")
    state = project / ".mmpipe"
    state.mkdir()
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp_id = client.create_experiment(
        ui.EXPERIMENT, artifact_location=(state / "mlartifacts").as_uri()
    )
    # both: an earlier test in this process may have pointed the registry elsewhere
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        with mlflow.start_run(experiment_id=exp_id, run_name=RUN_NAME) as run:
            mlflow.log_metrics({"accuracy": ACCURACY, "val_loss": 0.4321})
            mlflow.log_param("train.lr", 0.001)
            info = mlflow.pyfunc.log_model(
                name="model", python_model=Echo(), pip_requirements=["mlflow"]
            )
        version = mlflow.register_model(info.model_uri, ui.REGISTERED_MODEL).version
        client.set_registered_model_alias(ui.REGISTERED_MODEL, "champion", version)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert run.info.run_name == RUN_NAME
    return project, str(version)


@pytest.fixture(scope="module")
def server(store):
    project, _ = store
    out = io.StringIO()
    t0 = time.monotonic()
    srv = ui.serve_ui(project, port=_free_port(), block=False, out=out)
    print(f"MLflow UI up in {time.monotonic() - t0:.1f} s")
    try:
        yield srv, out.getvalue()
    finally:
        srv.stop()
    assert srv.process.poll() is not None


@pytest.fixture(scope="module")
def browser():
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _page(browser, url: str):
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    return page


def _close_assistant(page) -> None:
    """MLflow 3.17 auto-opens an "MLflow Assistant" side panel a moment after load: close it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_text("MLflow Assistant").first.wait_for(timeout=15_000)
    except PlaywrightTimeout:
        return  # a later MLflow may not open it
    page.get_by_role("button", name="Close").last.click()
    page.get_by_text("Ask questions about your").first.wait_for(state="hidden", timeout=5_000)


def test_serve_ui_prints_the_model_training_runs_url(server):
    srv, printed = server
    assert srv.experiment_id is not None
    expected = (
        f"{srv.base_url}/#/experiments/{srv.experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={ui.VIEW_KEY}"
    )
    assert srv.runs_url == expected
    assert f"MLflow UI: {expected}" in printed
    assert srv.base_url.startswith("http://127.0.0.1:")


def test_runs_page_shows_the_run_and_its_metric(server, browser):
    srv, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = _page(browser, srv.runs_url)
    try:
        page.get_by_text(RUN_NAME).first.wait_for(timeout=60_000)
        # the "Model training" runs table, not the GenAI overview/traces landing page
        page.get_by_role("heading", name="Runs").first.wait_for(timeout=10_000)
        assert page.get_by_text("Training runs", exact=True).count() == 0  # GenAI-mode title
        # the metric column comes from the shared view (not shown by default in 3.17)
        page.get_by_text(str(ACCURACY), exact=True).first.wait_for(timeout=20_000)
        page.get_by_text("accuracy", exact=True).first.wait_for(timeout=5_000)
        _close_assistant(page)
        page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))
    finally:
        page.close()


def test_model_page_shows_the_champion_alias(server, store, browser):
    srv, _ = server
    _, version = store
    ARTIFACTS.mkdir(exist_ok=True)
    page = _page(browser, ui.model_url(srv.base_url))
    try:
        page.get_by_text(f"Version {version}", exact=True).first.wait_for(timeout=60_000)
        page.get_by_text("champion").first.wait_for(timeout=10_000)
        _close_assistant(page)
    finally:
        page.screenshot(path=str(ARTIFACTS / "mlflow-model-champion.png"))
        page.close()


def test_missing_store_is_a_clear_error(tmp_path):
    from mmpipe.errors import InputError

    with pytest.raises(InputError, match="no MLflow store"):
        ui.serve_ui(tmp_path, port=_free_port(), block=False)
    assert not (tmp_path / ".mmpipe").exists()  # nothing created as a side effect


def test_ui_command_binds_loopback_on_the_project_store(tmp_path):
    cmd = ui.ui_command(tmp_path, port=5123)
    db = tmp_path.resolve() / ".mmpipe" / "mlflow.db"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{db}"
    assert cmd[cmd.index("--artifacts-destination") + 1] == str(db.parent / "mlartifacts")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--port") + 1] == "5123"
    assert shutil.which(cmd[0]) or Path(cmd[0]).exists()
