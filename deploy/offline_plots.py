"""`dvc plots show` without internet: an HTML template with Vega inlined, used by this clone.

    python deploy/offline_plots.py [PROJECT_DIR]     # make setup runs it

DVC's page loads vega, vega-lite and vega-embed from a CDN, so offline (or behind a proxy that
only lets package registries through) every chart is blank. This script fetches the same three
versions DVC's page asks for from the npm registry, checks each tarball against its published
sha512 integrity, and writes ``.dvc/plots-offline.html``: DVC's page with the three scripts
inlined. It then points this clone's DVC at it (``.dvc/config.local``, which git ignores;
``dvc config --local plots.html_template``), so ``dvc plots show`` and ``dvc plots diff`` write
a page that renders with no network. Nothing here runs any downloaded code: it only copies text.
"""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

# (package, version, npm "dist.integrity", file in the tarball): DVC's own page's versions
SCRIPTS = (
    ("vega", "5.20.2", "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==", "package/build/vega.min.js"),
    ("vega-lite", "5.2.0", "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==", "package/build/vega-lite.min.js"),
    ("vega-embed", "6.18.2", "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==", "package/build/vega-embed.min.js"),
)  # fmt: skip
REGISTRY = "https://registry.npmjs.org"
TEMPLATE = "plots-offline.html"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot (offline: %(versions)s inlined)</title>
%(scripts)s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch(package: str, version: str, integrity: str, member: str) -> str:
    """The text of ``member`` in the npm tarball, after checking the tarball's sha512."""
    url = f"{REGISTRY}/{package}/-/{package}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        blob = response.read()
    algo, _, expected = integrity.partition("-")
    actual = base64.b64encode(hashlib.new(algo, blob).digest()).decode()
    if actual != expected:
        raise SystemExit(f"{url}: {algo} {actual} is not the published {expected}")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        text = tar.extractfile(member).read().decode("utf-8")  # type: ignore[union-attr]
    # inlined, a script must not close its own tag or look like one of DVC's placeholders
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in text:
            raise SystemExit(f"{package}@{version}: {member} contains {bad!r}; cannot inline it")
    return text


def render() -> str:
    """DVC's page with the three scripts inlined."""
    scripts = "\n".join(
        f"    <script>/* {p}@{v} */\n{fetch(p, v, i, m)}\n    </script>" for p, v, i, m in SCRIPTS
    )
    versions = ", ".join(f"{p}@{v}" for p, v, _, _ in SCRIPTS)
    return PAGE % {"versions": versions, "scripts": scripts}


def install(project: Path) -> Path:
    """Write ``.dvc/plots-offline.html`` and make it this clone's DVC plots template."""
    dvc_dir = project / ".dvc"
    if not dvc_dir.is_dir():
        raise SystemExit(f"{project} is not a DVC project (no .dvc/)")
    page = dvc_dir / TEMPLATE
    tmp = page.with_suffix(".tmp")
    tmp.write_text(render(), encoding="utf-8")
    tmp.replace(page)
    dvc = Path(sys.executable).parent / "dvc"
    subprocess.run(
        [str(dvc), "config", "--local", "plots.html_template", TEMPLATE], cwd=project, check=True
    )
    return page


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    project = Path(args[0] if args else ".").resolve()
    try:
        page = install(project)
    except OSError as exc:  # offline: DVC keeps its CDN page (PNGs stay in reports/plots/)
        print(f"offline plots: not installed ({exc}); `dvc plots show` will load Vega from a CDN")
        return 0
    print(f"offline plots: {page.relative_to(project)} ({page.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
