#!/usr/bin/env bash
# The prepared GPU check, one command of at most 8 minutes on a CUDA machine (H100 / H200), from any folder:
#   bash benchmarks/gpu_check.sh OUT_DIR [SECTIONS]     # SECTIONS: some of correctness,decode,kernels (default: all)
# Versions and GPU, kernel correctness, end-to-end decode, kernel timings: see benchmarks/gpu_check.py. It needs only the
# GPU image's torch, triton and transformers; wheels in an ignored .whl/ folder, if any, are installed first.
# Writes OUT_DIR/gpu_check.json, gpu_check.md and gpu_check.log (commit the JSON as benchmarks/results/gpu_check.json).
set -euo pipefail
OUT=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv \
  | tee "$OUT/nvidia-smi.csv"
export PYTHONUNBUFFERED=1
# 7 minutes of sections (the decode section stops early), then a hard stop before the 8-minute mark
timeout 470 python3 benchmarks/gpu_check.py --out "$OUT" --minutes 7 --sections "${2:-correctness,decode,kernels}" 2>&1 \
  | tee "$OUT/gpu_check.log"
