"""Run every benchmark script in turn and write ``results/summary.json`` plus a Markdown table.

    python -m benchmarks                  # full sizes (make bench), ~30-40 min on 2 cores
    python -m benchmarks --quick          # smaller N
    python -m benchmarks --smoke          # seconds each: checks the scripts, not the machine
    python -m benchmarks --only loader,train

Each script runs in its own process (fresh imports, allocator and Prefect state), so one script's
warm caches never flatter the next one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, RESULTS, machine
from benchmarks._common import _fmt as fmt

SCRIPTS = (
    "ingest_shard",
    "loader",
    "memory",
    "growth",
    "orchestration",
    "train",
    "ui",
    "object_store",
    "dask",
    "incremental",
    "feature_cache",
    "limits",
)


def markdown(payloads: list[dict[str, Any]]) -> str:
    """One table over every script: figure, value, ratio, target, met, conditions, command."""

    lines = [
        "| script | figure | value | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in payloads:
        for f in p["figures"]:
            met = {True: "yes", False: "**no**", None: "-"}[f["met"]]
            lines.append(
                f"| {p['name']} | {f['figure']} | {fmt(f['value'])} {f['unit']} | "
                f"{fmt(f['ratio'])} | {f['target'] or '-'} | {met} | {f['note']} |"
            )
    lines.append("")
    for p in payloads:
        lines.append(f"- `{p['command']}` ({p['mode']}, {p['seconds']:.0f} s, {p['finished_at']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny N: checks the scripts")
    size.add_argument("--quick", action="store_true", help="smaller N than the full run")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where the JSON files go")
    args = ap.parse_args(argv)
    names = [s for s in args.only.split(",") if s] or list(SCRIPTS)
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(SCRIPTS)}")
    flag = ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
    payloads, failed = [], []
    for name in names:
        print(f"== benchmarks.bench_{name} {' '.join(flag)}", flush=True)
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            f"benchmarks.bench_{name}",
            *flag,
            "--out-dir",
            str(args.out_dir),
        ]
        rc = subprocess.run(cmd, cwd=REPO).returncode
        out = args.out_dir / f"{name}.json"
        if (
            rc != 0
            or not out.exists()
            or out.stat().st_mtime < time.time() - (time.perf_counter() - t0) - 1
        ):
            failed.append(name)
            print(f"!! bench_{name} failed (exit {rc})", file=sys.stderr, flush=True)
            continue
        payloads.append(json.loads(out.read_text()))
    # the summary covers every script's latest result in out-dir (a --only run refreshes some)
    latest = [args.out_dir / f"{n}.json" for n in SCRIPTS if n not in names]
    payloads += [json.loads(f.read_text()) for f in latest if f.exists()]
    payloads.sort(key=lambda q: SCRIPTS.index(q["name"]) if q["name"] in SCRIPTS else 99)
    summary = {"machine": machine(), "scripts": payloads, "failed": failed}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (args.out_dir / "summary.md").write_text(markdown(payloads))
    print(f"wrote {args.out_dir / 'summary.json'} and summary.md", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
