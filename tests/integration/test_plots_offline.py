"""`dvc plots show` renders every chart with no network: the page `make setup` points DVC at
(deploy/offline_plots.py: Vega inlined) opened in headless Chromium with every request that is
not a local file refused. DVC's own page loads Vega from a CDN and stays blank offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmpipe.io import write_json_atomic
from tests.integration.test_ui_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, _require_chromium
from tests.unit.test_plots import _rows

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / ".dvc" / "plots-offline.html"


def _show(root: Path, *args: str) -> Path:
    """`dvc plots show` of the project's dvc.yaml over generated rows; the page it wrote."""
    dvc = str(Path(sys.executable).parent / "dvc")
    out = root / "dvc_plots"
    proc = subprocess.run(
        [dvc, "plots", "show", "-o", str(out), *args],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out / "index.html"


def _rendered(page_path: Path, shot: Path | None = None) -> tuple[int, int, list[str]]:
    """(plot divs, of which drawn by vega-embed, requests that tried to leave the machine)."""
    from playwright.sync_api import sync_playwright

    refused: list[str] = []

    def route(r):
        if r.request.url.startswith("file://"):
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.route("**/*", route)
            page.goto(page_path.as_uri())
            page.wait_for_timeout(3000)  # vega-embed draws asynchronously
            divs = page.locator("body > div[id]").count()
            drawn = page.locator("div.vega-embed canvas, div.vega-embed svg.marks").count()
            if shot is not None:
                page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    return divs, drawn, refused


def test_every_dvc_plot_renders_offline_with_the_setup_template(tmp_path):
    _require_chromium()
    assert TEMPLATE.is_file(), "make setup writes .dvc/plots-offline.html (deploy/offline_plots.py)"
    dvc = str(Path(sys.executable).parent / "dvc")
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    for name, rows in _rows().items():
        write_json_atomic(tmp_path / "reports" / "plots" / f"{name}.json", rows)
    shutil.copy(TEMPLATE, tmp_path / ".dvc" / TEMPLATE.name)
    subprocess.run(
        [dvc, "config", "--local", "plots.html_template", TEMPLATE.name], cwd=tmp_path, check=True
    )
    ARTIFACTS.mkdir(exist_ok=True)
    divs, drawn, refused = _rendered(_show(tmp_path), ARTIFACTS / "dvc-plots-offline.png")
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    assert divs == len(declared) and drawn == divs, (divs, drawn)
    assert refused == []  # nothing asked for the network

    # DVC's own page (no template) is what users had: Vega from a CDN, nothing drawn offline
    subprocess.run([dvc, "config", "--local", "--unset", "plots.html_template"], cwd=tmp_path)
    divs, drawn, refused = _rendered(_show(tmp_path))
    assert drawn == 0 and any("cdn.jsdelivr.net" in u for u in refused)
