"""`mmpipe ui` in a real browser: headless Debian Chromium (Playwright) against the MLflow UI.

The store is shaped like the nightly flow's: per night a parent run ``nightly`` (tag
``mmpipe.kind=flow``) with nested stage runs, the ``train`` run carrying ``test.*`` metrics and the
model, a registered ``mmpipe-fusion`` version per night and the ``champion`` alias on the better
one. The UI is started through mmpipe.ui with the project's params, and each landing page is
checked for what a training user must see there (``LANDING``). Screenshots go to
test-artifacts/ (gitignored).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mmpipe import services, ui
from mmpipe.config import load_params

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
EXPERIMENT = "nightly-retraining"  # not the default: the UI must follow tracking.experiment
# Two nights: (test accuracy, macro F1); night 2 is better, so it holds the champion alias.
NIGHTS = [(0.6875, 0.6512), (0.8125, 0.7934)]
# What each landing page must show, in order where it matters (table headers left to right).
# The champion's model card (written by the register stage) is one more entry under "model".
HEADLINE_HEADERS = ["Models", "test.accuracy", "test.macro_f1", "test.i2t_r1", "test.t2i_r1",
                    "test.fusion_gain", "val_accuracy", "test.n_test_pairs"]  # fmt: skip
LANDING = {
    "runs": [str(acc) for acc, _ in NIGHTS],
    "model": ["champion", "Version 2"],
    # the champion version's page: its description is the model card (the registered model's
    # Description panel is collapsed by default, the version's is not)
    "champion": ["Promoted to champion", "Trained on", "Data hash", "test split"],
}
NOT_SHOWN = ["lr", "bytes", "captions.accepted"]  # logged, but not headline metrics


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


def _log_night(client, exp_id: str, night: int, model_cls) -> str:
    """One night as the flow logs it: parent, a data stage, train with test.* and the model."""
    import mlflow

    acc, f1 = NIGHTS[night]
    parent = client.create_run(exp_id, run_name="nightly", tags={"mmpipe.kind": "flow"})
    pid = parent.info.run_id
    stage = client.create_run(
        exp_id, run_name="ingest", tags={"mlflow.parentRunId": pid, "mmpipe.kind": "stage"}
    )
    client.log_metric(stage.info.run_id, "captions.accepted", 96)
    client.log_metric(stage.info.run_id, "bytes", 123456)
    client.set_terminated(stage.info.run_id)
    with mlflow.start_run(experiment_id=exp_id, run_name="train", parent_run_id=pid):
        mlflow.log_metrics({"lr": 0.001, "val_accuracy": acc - 0.05, "epoch": 3})
        mlflow.log_metrics({"test.accuracy": acc, "test.macro_f1": f1, "test.i2t_r1": 0.25})
        mlflow.log_metrics({"test.t2i_r1": 0.5, "test.fusion_gain": 0.125})
        mlflow.log_metrics({"test.n_test_pairs": 32})
        info = mlflow.pyfunc.log_model(
            name="model", python_model=model_cls(), pip_requirements=["mlflow"]
        )
    client.set_terminated(pid)
    return info.model_uri


def _card() -> str:
    """The champion's model card, as the register stage writes it (mmpipe.modelcard)."""
    from mmpipe.modelcard import render_card

    (old_acc, old_f1), (acc, f1) = NIGHTS
    registered = {"model_name": "mmpipe-fusion", "version": 2, "metric": "accuracy",
                  "value": acc, "promoted": True, "previous_champion_version": 1,
                  "previous_champion_value": old_acc}  # fmt: skip
    data = {"source": "synthetic", "description": "generated shapes", "images": 96,
            "captions": 192, "pairs_per_split": {"train": 150, "val": 20, "test": 22},
            "classes": ["consistent", "inconsistent"], "labels": "all", "data_hash": "ab" * 32}  # fmt: skip
    return render_card(
        registered=registered, metrics={"accuracy": acc, "macro_f1": f1}, data=data,
        task="multiclass", champion={"version": 1, "metrics": {"accuracy": old_acc}},
        commit="0123456789abcdef", params_note="`params.yaml`",
    )  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project whose params name the experiment, with two nights in its MLflow store."""
    import mlflow
    from mlflow import MlflowClient

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    project = tmp_path_factory.mktemp("ui-project")
    (project / "params.yaml").write_text(f"tracking:\n  experiment: {EXPERIMENT}\n")
    state = project / ".mmpipe"
    state.mkdir()
    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp_id = client.create_experiment(
        EXPERIMENT, artifact_location=(state / "mlartifacts").as_uri()
    )
    # both: an earlier test in this process may have pointed the registry elsewhere
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        for night in range(len(NIGHTS)):
            version = mlflow.register_model(
                _log_night(client, exp_id, night, Echo), "mmpipe-fusion"
            )
        client.set_registered_model_alias("mmpipe-fusion", "champion", version.version)
        client.update_model_version("mmpipe-fusion", version.version, description=_card())
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    return project


def _env() -> dict[str, str]:
    """This process's environment without the MLFLOW_TRACKING_URI that earlier tests' calls of
    mlflow.set_tracking_uri() exported: the UI must find the store through the params."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def _target(project: Path, *overrides: str) -> ui.UiTarget:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return ui.create_ui_target(load_params(project / "params.yaml", list(overrides)), project)


@pytest.fixture(scope="module")
def server(project):
    out = io.StringIO()
    t0 = time.monotonic()
    srv = ui.serve_ui(_target(project), port=_free_port(), block=False, out=out)
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


def _close_assistant(page) -> None:
    """MLflow 3.17 auto-opens an "MLflow Assistant" side panel a moment after load: close it."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_text("MLflow Assistant").first.wait_for(timeout=15_000)
    except PlaywrightTimeout:
        return  # a later MLflow may not open it
    page.get_by_role("button", name="Close").last.click()
    page.get_by_text("Ask questions about your").first.wait_for(state="hidden", timeout=5_000)


def _open(browser, url: str, page_name: str):
    """The landing page, after checking every ``LANDING[page_name]`` text shows on it."""
    page = browser.new_page(viewport={"width": 1900, "height": 1000})
    page.goto(url)
    for text in LANDING[page_name]:
        page.get_by_text(text).first.wait_for(timeout=60_000)
    _close_assistant(page)
    return page


def _header_x(page, text: str) -> float:
    """Left edge of the runs table's column header ``text``."""
    header = page.get_by_role("columnheader").filter(has_text=re.compile(f"^{re.escape(text)}$"))
    box = header.first.bounding_box(timeout=10_000)
    assert box is not None, f"column {text!r} not rendered"
    return box["x"]


def test_serve_ui_prints_the_landing_url_of_the_configured_experiment(server):
    srv, printed = server
    assert srv.experiment_id is not None
    expected = (
        f"{srv.base_url}/#/experiments/{srv.experiment_id}/runs?workflowType=machine_learning"
        f"&viewStateShareKey={ui.VIEW_KEY}"
    )
    assert srv.runs_url == expected
    assert f"MLflow UI: {expected}" in printed
    assert f"{srv.base_url}/#/models/mmpipe-fusion?" in printed
    assert srv.base_url.startswith("http://127.0.0.1:")


def test_runs_page_shows_each_nights_result_in_the_headline_columns(server, browser):
    srv, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = _open(browser, srv.runs_url, "runs")
    try:
        # the "Model training" runs table, not the GenAI overview/traces landing page
        page.get_by_role("heading", name="Runs").first.wait_for(timeout=10_000)
        assert page.get_by_text("Training runs", exact=True).count() == 0  # GenAI-mode title
        xs = [_header_x(page, h) for h in HEADLINE_HEADERS]
        assert xs == sorted(xs), dict(zip(HEADLINE_HEADERS, xs, strict=True))  # declared order
        for name in NOT_SHOWN:
            assert page.get_by_role("columnheader", name=name, exact=True).count() == 0
        # one row per night with its own result, not a collapsed parent run without metrics
        for _acc, f1 in NIGHTS:
            page.get_by_text(str(f1), exact=True).first.wait_for(timeout=5_000)
        assert page.get_by_text("mmpipe-fusion", exact=True).count() == len(NIGHTS)
        page.screenshot(path=str(ARTIFACTS / "mlflow-runs.png"))
    finally:
        page.close()


def test_model_page_shows_the_champion(server, browser):
    srv, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = _open(browser, srv.model_url, "model")
    try:
        page.screenshot(path=str(ARTIFACTS / "mlflow-model-champion.png"))
    finally:
        page.close()


def test_champion_version_page_shows_its_model_card(server, browser):
    srv, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = _open(browser, f"{srv.base_url}/#/models/mmpipe-fusion/versions/2", "champion")
    try:
        page.get_by_text("0.8125").first.wait_for(timeout=10_000)  # the metrics table
        page.screenshot(path=str(ARTIFACTS / "mlflow-model-card.png"), full_page=True)
    finally:
        page.close()


def test_report_page_opens_with_the_verdict_and_its_charts(browser, tmp_path):
    """reports/report.html as a person opens it from disk: the verdict first, charts embedded."""
    from mmpipe.io import write_json_atomic
    from mmpipe.plots import recall_rows, write_plot
    from mmpipe.report import write_report

    (old, _), (acc, f1) = NIGHTS
    write_json_atomic(tmp_path / "metrics.json", {"accuracy": acc, "macro_f1": f1,
                                                  "i2t_r1": 0.25, "n_test_pairs": 32.0})  # fmt: skip
    chance = {"i2t": {1: 0.1, 5: 0.5}, "t2i": {1: 0.1, 5: 0.5}}
    write_plot(tmp_path / "plots", "recall_at_k",
               recall_rows([1, 5], {1: 0.25, 5: 0.75}, {1: 0.5, 5: 0.875}, chance))  # fmt: skip
    history = [{"epoch": e, "train_loss": 2 / e, "val_loss": 1.8 / e, "val_accuracy": 0.5 + e / 10}
               for e in (1, 2, 3)]  # fmt: skip
    write_plot(tmp_path / "plots", "training", history)
    registered = {"model_name": "mmpipe-fusion", "version": 2, "metric": "accuracy",
                  "value": acc, "promoted": True, "previous_champion_version": 1,
                  "previous_champion_value": old, "champion_version": 2}  # fmt: skip
    context = {"origin": "nightly flow", "date": "2026-11-26T02:00:05Z", "commit": "0123abcd",
               "dirty": False, "params_file": "params.yaml", "overrides": [],
               "params": {"train": {"task": "multiclass", "fusion": "concat"}},
               "registered": registered, "champion": {"version": 1, "metrics": {"accuracy": old}},
               "changes": {"params": {}, "data": False, "commit": ["aaaa", "0123abcd"]}}  # fmt: skip
    html_path = write_report(tmp_path, context)["html"]
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    try:
        page.goto(Path(html_path).as_uri())
        verdict = page.locator(".verdict").first
        assert "promoted to champion" in verdict.inner_text()
        assert verdict.bounding_box()["y"] < 200  # the first thing on the page
        images = page.locator("img")
        assert images.count() >= 2 and all(
            images.nth(i).evaluate("i => i.complete && i.naturalWidth > 100")
            for i in range(images.count())
        )  # the charts render from the page alone (data URIs), offline
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    finally:
        page.close()


def test_a_tracking_server_uri_uses_that_servers_ui(server, project):
    """tracking.uri = http://...: nothing is started, the URLs point at that server."""
    srv, _ = server
    out = io.StringIO()
    remote = ui.serve_ui(_target(project, f"tracking.uri={srv.base_url}"), port=1, out=out)
    assert remote.process is None
    assert remote.runs_url == srv.runs_url
    assert "nothing started" in out.getvalue()


def _listeners(port: int) -> list[int]:
    return [
        c.pid or -1
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    ]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_mmpipe_ui_stopped_by_a_signal_leaves_no_process(project, sig):
    """`mmpipe ui` ended by SIGTERM (kill, make) or SIGHUP (terminal closed) stops the whole
    MLflow server: nothing listens on the port and none of its processes survive."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mmpipe", "ui", "--project-dir", str(project), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, start_new_session=True, env=_env()
    )
    server_procs: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the server answers
        assert line.startswith("MLflow UI: http://127.0.0.1:"), line
        server_procs += psutil.Process(proc.pid).children(recursive=True)
        assert server_procs and _listeners(port)
        # job runner off: the server is `mlflow server` + one uvicorn worker, no huey consumers
        assert len(server_procs) == 2, [p.cmdline()[:4] for p in server_procs]
        proc.send_signal(sig)  # to `mmpipe ui` only, as kill or a terminal would
        assert proc.wait(30) == 128 + sig
        gone, alive = psutil.wait_procs(server_procs, timeout=10)
        assert not alive, [p.cmdline()[:4] for p in alive]
        assert not _listeners(port) and not services.port_in_use("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in server_procs:  # only if the test failed: leave nothing behind
            with contextlib.suppress(psutil.Error):
                p.kill()
