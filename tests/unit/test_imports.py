"""What a data stage's process imports: `dvc repro` runs ingest, align and shard as three
processes, and each pays its own imports (torch alone was ~1.6 CPU-s per process, a third of
ingest + align + shard's CPU on 2,400 photos; benchmarks/README.md)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, TINY_OVERRIDES

# modules only training, augmentation, tracking or the flow use. (pandas is not listed: pyarrow
# imports it on its first conversion when it is installed, ~0.25 CPU-s, and offers no opt-out.)
HEAVY = ("torch", "albumentations", "webdataset", "mlflow", "prefect")

RUN_STAGES = """
import json, sys
from mmpipe.cli import main
project, params, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
for stage in ("ingest", "curate", "align", "shard"):
    code = main([stage, "--params", params, "--project-dir", project, *sets])
    assert code == 0, f"{stage} exited {code}"
print(json.dumps(sorted(m for m in HEAVY if m in sys.modules)))
"""


def test_data_stages_do_not_import_training_or_tracking_modules(tmp_path):
    sets = [f"--set={s}" for s in TINY_OVERRIDES if s.split(".")[0] in ("ingest", "shard")]
    script = f"HEAVY = {HEAVY!r}\n{RUN_STAGES}"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), str(REPO / "params.yaml"), *sets],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
