#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): on a CUDA machine, the real-photo recipe's training
# step for a fixed number of steps beside a bare PyTorch loop on the same model and batch, then
# the gpu-marked tests. Runs to completion on CPU too (it says that no GPU was found).
#   bash benchmarks/gpu_check.sh            (from the repo root, after `make setup`)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 420 "$PY" -m benchmarks.gpu_check --steps "${STEPS:-20}" --batch "${BATCH:-128}"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  timeout 60 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
else
  echo "gpu_check: no GPU found: the gpu-marked tests are skipped here"
fi
