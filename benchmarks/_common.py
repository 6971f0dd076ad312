"""Shared helpers of the benchmark scripts: arguments, machine facts, timing, tables, JSON.

Every script measures a *ratio* between two things run side by side in the same process and the
same minute (this machine is shared, so absolute seconds drift by tens of percent run to run).
Where both sides are timed several times they are interleaved (A B A B ...) and the best time of
each side is kept: the best run is the one least disturbed by the neighbours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

# Offline hubs and a throw-away Prefect home unless the caller chose otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "bench-prefect"))
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments every script takes."""
    ap = argparse.ArgumentParser(
        prog=f"python -m benchmarks.bench_{name}", description=(doc or "").split("\n")[0]
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny N: checks the script, seconds")
    size.add_argument("--quick", action="store_true", help="smaller N than the full run")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where <name>.json goes")
    ap.add_argument("--work-dir", type=Path, default=None, help="scratch dir (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir")
    return ap


def mode(args: argparse.Namespace) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def pick(args: argparse.Namespace, smoke: Any, quick: Any, full: Any) -> Any:
    return {"smoke": smoke, "quick": quick, "full": full}[mode(args)]


@contextmanager
def workdir(args: argparse.Namespace, name: str) -> Iterator[Path]:
    """A scratch directory, removed afterwards unless --keep or --work-dir was given."""
    if args.work_dir is not None:
        path = Path(args.work_dir) / name
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix=f"mmpipe-bench-{name}-"))
    try:
        yield path
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)


def machine() -> dict[str, Any]:
    """The facts that condition every figure."""
    import torch

    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:  # pragma: no cover
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "gpu": torch.cuda.is_available(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def figure(
    name: str,
    value: float,
    unit: str,
    *,
    target: str | None = None,
    met: bool | None = None,
    ratio: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One reported figure: value, its target (text), whether it is met, the ratio behind it."""
    return {
        "figure": name,
        "value": round(float(value), 4),
        "unit": unit,
        "ratio": None if ratio is None else round(float(ratio), 4),
        "target": target,
        "met": met,
        "note": note,
    }


def finish(
    name: str,
    args: argparse.Namespace,
    argv: list[str] | None,
    figures: list[dict[str, Any]],
    conditions: dict[str, Any],
    data: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Print the table and write <out-dir>/<name>.json; returns the payload."""
    payload = {
        "name": name,
        "mode": mode(args),
        "command": "python -m benchmarks.bench_" + name + "".join(f" {a}" for a in argv or []),
        "machine": machine(),
        "conditions": conditions,
        "figures": figures,
        "data": data,
        "seconds": round(time.perf_counter() - started, 2),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print_table(f"{name} ({mode(args)}, {payload['seconds']:.0f}s)", figures)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return payload


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def print_table(title: str, figures: list[dict[str, Any]]) -> None:
    """A rich table of figures (plain text when rich is missing or output is not a terminal)."""
    cols = ("figure", "value", "unit", "ratio", "target", "met")
    rows = [
        [
            f["figure"],
            _fmt(f["value"]),
            f["unit"],
            _fmt(f["ratio"]),
            f["target"] or "-",
            {True: "yes", False: "NO", None: "-"}[f["met"]],
        ]
        for f in figures
    ]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="right" if c in ("value", "ratio") else "left")
        for r in rows:
            table.add_row(*r)
        Console(width=160).print(table)
    except ImportError:  # pragma: no cover
        print(title)
        for r in [list(cols), *rows]:
            print("  ".join(str(x) for x in r))
    sys.stdout.flush()


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Run each fn ``repeats`` times, interleaved; best seconds, all seconds, last results."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            results[key] = fn()
            times[key].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, times, results


# ----------------------------------------------------------------------------- pipeline fixtures


def synthetic_source(dest: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """A folder of n synthetic JPEGs + captions.csv (one caption per image), cached by params."""
    from mmpipe.config import SyntheticParams
    from mmpipe.synthetic import generate

    p = SyntheticParams(n_images=n, image_size=image_size, captions_per_image=1, seed=seed)
    generate(dest, p, workers=os.cpu_count() or 1)
    return dest


def folder_ingest_params(src: Path, workers: int = 1) -> Any:
    from mmpipe.config import IngestParams

    return IngestParams(source="folder", root=str(src), captions="captions.csv", workers=workers)


def shard_params(image_size: int, workers: int = 1, **kw: Any) -> Any:
    """Shard params of the fair comparison: no offline copies (one sample per caption)."""
    from mmpipe.config import ShardParams

    return ShardParams(image_size=image_size, copies=0, workers=workers, **kw)


def ingest_align(src: Path, work: Path, workers: int = 1) -> tuple[Path, Path, dict[str, Any]]:
    """Folder ingest + align into work/ingest, work/align; the ingest report."""
    from mmpipe.align import run_align
    from mmpipe.config import AlignParams
    from mmpipe.ingest import run_ingest

    ingest_dir, align_dir = work / "ingest", work / "align"
    report = run_ingest(folder_ingest_params(src, workers), ingest_dir)
    run_align(ingest_dir, AlignParams(), align_dir)
    return ingest_dir, align_dir, report


def image_paths(src: Path) -> list[Path]:
    return sorted((src / "images").glob("*.jpg"))


def mmpipe_run(params: Path, project: Path, overrides: list[str]) -> float:
    """``mmpipe run --params <params>`` in its own project directory (its own MLflow store),
    log in ``project/run.log``; its wall seconds. SystemExit when the run fails."""
    import subprocess

    project.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mmpipe", "run", "--params", str(params),
           "--project-dir", str(project)] + [a for o in overrides for a in ("--set", o)]  # fmt: skip
    # one intra-op thread: on this shared 2-core machine two OpenMP threads per process ran a
    # CNN + LSTM step up to 20x slower than one (spinning threads fighting the neighbours)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    with (project / "run.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"mmpipe run failed ({proc.returncode}); see {project}/run.log")
    return round(time.perf_counter() - started, 1)


def update_readme_block(
    start: str, end: str, table: str, command: str, readme: Path = REPO / "README.md"
) -> None:
    """Replace the text between the README's ``start`` and ``end`` markers with ``table`` and
    the command + date that produced it."""
    import re

    text = readme.read_text(encoding="utf-8")
    block = f"{start}\n{table}\n\n(`{command}`, {time.strftime('%Y-%m-%d')})\n{end}"
    pattern = re.escape(start) + ".*?" + re.escape(end)
    if not re.search(pattern, text, flags=re.S):
        raise SystemExit(f"{readme}: no {start} ... {end} markers")
    readme.write_text(re.sub(pattern, lambda _: block, text, flags=re.S), encoding="utf-8")


# ----------------------------------------------------------------------------- README benchmarks


def readme_benchmark_args(name: str, doc: str | None, work_dir: str) -> argparse.ArgumentParser:
    """The arguments of a script whose table goes between README markers: --smoke, --work-dir,
    --out-dir, --update-readme and --readme-from (the table from a saved full run's JSON)."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc)
    ap.add_argument("--smoke", action="store_true", help="tiny params: checks the script")
    ap.add_argument("--work-dir", type=Path, default=Path(work_dir), help="project dir(s)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where {name}.json goes")
    ap.add_argument("--update-readme", action="store_true", help="rewrite README.md's table")
    ap.add_argument("--readme-from", type=Path, default=None, metavar="JSON",
                    help=f"rewrite README.md's table from a saved full run's {name}.json "
                    "(no training)")  # fmt: skip
    return ap


def saved_full_run(
    path: Path,
    overrides: list[str],
    complete: Callable[[dict[str, Any]], bool] = lambda saved: True,
    what: str = "a full-size run",
) -> dict[str, Any]:
    """A saved run's JSON, refused (SystemExit) unless it is the full-size run with these
    ``overrides`` (and ``complete``): a README table never comes from a smoke or changed run."""
    saved = json.loads(Path(path).read_text())
    if saved["mode"] != "full" or saved["overrides"] != overrides or not complete(saved):
        raise SystemExit(f"{path}: not {what}")
    return saved


def save_readme_table(
    name: str,
    args: argparse.Namespace,
    result: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
    update_readme: Callable[[str], None],
) -> int:
    """A README benchmark's end: its table into ``result``, ``<out-dir>/<name>.json``, the table
    printed, and the README's block rewritten with --update-readme; exit code 0."""
    result["table"] = markdown(result)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(result["table"])
    if args.update_readme:
        update_readme(result["table"])
    return 0


def parse_readme_args(
    name: str,
    doc: str | None,
    work_dir: str,
    argv: list[str] | None,
    full: list[str],
    from_saved: Callable[[dict[str, Any]], None],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace | None:
    """The parsed ``readme_benchmark_args`` (+ the script's own, ``extra``); None when
    --readme-from was given and ``from_saved`` has rewritten the README from that saved ``full``
    run. --update-readme with --smoke is refused before any work."""
    ap = readme_benchmark_args(name, doc, work_dir)
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.readme_from is not None:
        from_saved(saved_full_run(args.readme_from, full))
        return None
    if args.update_readme and args.smoke:
        raise SystemExit("--update-readme needs the full-size run")
    return args
