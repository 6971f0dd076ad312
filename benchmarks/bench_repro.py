"""How far the default run's metrics move between CPUs of this kind (docs/results.md).

    python -m benchmarks.bench_repro            # the default run's params (~3 trainings, 2 cores)
    python -m benchmarks.bench_repro --quick    # 2 epochs
    python -m benchmarks.bench_repro --smoke    # tiny params: checks the script

On one machine the default run is bit-reproducible (tests). Across machines the float
reductions of training run in another order when the CPU's vector kernels or the number of
intra-op threads differ, and eight epochs amplify that. No second machine is available here, so
the script makes this one behave like others, each a *variant* of the same data and params:

- ``same``: the run again, unchanged (expected: the same checkpoint bytes);
- ``avx2``: PyTorch's and oneDNN's AVX2 kernels instead of AVX-512 (``ATEN_CPU_CAPABILITY``,
  ``ONEDNN_MAX_CPU_ISA``): what an older x86 CPU runs;
- ``1-thread``: one intra-op thread instead of two (a machine with another core count).

The data stages run once; each variant trains and evaluates in its own copy of the project.
The figures are the largest absolute difference of each headline metric from the base run: the
tolerance docs/results.md states.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, figure, finish, parser, pick, workdir

VARIANTS: dict[str, dict[str, str]] = {
    "base": {},
    "same": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "1-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
}
SMOKE = [
    "ingest.synthetic.n_images=48", "ingest.synthetic.captions_per_image=2",
    "ingest.synthetic.image_size=32", "ingest.workers=1", "shard.image_size=32",
    "shard.workers=1", "train.epochs=1", "train.batch_size=16", "train.num_workers=0",
    "evaluate.ablation_epochs=1",
]  # fmt: skip
HEADLINE = (
    "accuracy",
    "macro_f1",
    "fusion_gain",
    "i2t_r1",
    "t2i_r1",
    "i2t_r5",
    "t2i_r5",
    "mean_r1",
)


def mmpipe(project: Path, command: str, overrides: list[str], env: dict[str, str]) -> None:
    """``python -m mmpipe <command>`` in ``project``; exits with its log on failure."""
    cmd = [sys.executable, "-m", "mmpipe", command, "--project-dir", str(project)]
    cmd += [a for o in overrides for a in ("--set", o)]
    full_env = {**os.environ, **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)  # each project keeps its own store (the default)
    with (project / f"{command}.log").open("a") as log:
        proc = subprocess.run(
            cmd, cwd=project, env=full_env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        raise SystemExit(
            f"mmpipe {command} failed ({proc.returncode}); see {project}/{command}.log"
        )


def prepare(base: Path, overrides: list[str]) -> None:
    """A project with params.yaml and the data stages' outputs."""
    base.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", base / "params.yaml")
    for stage in ("ingest", "curate", "align", "shard"):
        mmpipe(base, stage, overrides, {})


def run_variant(base: Path, project: Path, overrides: list[str], env: dict[str, str]) -> dict:
    """Train + evaluate one variant in a copy of ``base``; its metrics and checkpoint hash."""
    shutil.copytree(base, project, ignore=shutil.ignore_patterns("*.log"))
    started = time.perf_counter()
    mmpipe(project, "train", overrides, env)
    mmpipe(project, "evaluate", overrides, env)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    digest = hashlib.sha256((project / "models" / "best.pt").read_bytes()).hexdigest()
    return {
        "env": env,
        "seconds": round(time.perf_counter() - started, 1),
        "metrics": {k: metrics[k] for k in HEADLINE if k in metrics},
        "best_pt_sha256": digest,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = parser("repro", __doc__)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    overrides = pick(args, SMOKE, ["train.epochs=2", "evaluate.ablation_epochs=1"], [])
    names = [v for v in args.variants.split(",") if v]
    if names[0] != "base":
        names.insert(0, "base")
    runs: dict[str, dict] = {}
    with workdir(args, "repro") as work:
        prepare(work / "data", overrides)
        for name in names:
            runs[name] = run_variant(work / "data", work / name, overrides, VARIANTS[name])
            print(f"{name}: {runs[name]['metrics']} ({runs[name]['seconds']} s)", flush=True)
    base = runs["base"]
    figures = []
    for name in names[1:]:
        run = runs[name]
        same = run["best_pt_sha256"] == base["best_pt_sha256"]
        figures.append(
            figure(
                f"{name}: checkpoint identical to base", float(same), "bool", note=str(run["env"])
            )
        )
        for key, value in run["metrics"].items():
            diff = abs(value - base["metrics"][key])
            figures.append(
                figure(
                    f"{name}: |Δ {key}|",
                    diff,
                    "abs",
                    ratio=value / base["metrics"][key] if base["metrics"][key] else None,
                )
            )
    tolerance = {
        key: max(abs(runs[n]["metrics"][key] - base["metrics"][key]) for n in names[1:])
        for key in base["metrics"]
    }
    for key, value in tolerance.items():
        figures.append(figure(f"tolerance (max over variants): {key}", value, "abs"))
    conditions = {"overrides": overrides, "variants": {n: VARIANTS[n] for n in names}}
    return finish(
        "repro", args, argv, figures, conditions, {"runs": runs, "tolerance": tolerance}, started
    )


if __name__ == "__main__":
    main()
