#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite on the real SmolLM2-135M weights and Wikipedia text; then the
# vLLM plugin's tests under vLLM's CPU build (.venv-vllm). set -e: the first failing run fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# With no arguments the vLLM plugin's tests run after the main suite, under vLLM's CPU build (.venv-vllm, see
# setup_vllm.sh): build that meanwhile, mostly downloads and unpacking. With arguments, only the tests they name run.
if [ $# -eq 0 ]; then
  vllm_log=$(mktemp)
  bash scripts/setup_vllm.sh > "$vllm_log" 2>&1 &
  vllm_setup=$!
  trap 'kill $vllm_setup 2>/dev/null || true; rm -f "$vllm_log"' EXIT
fi
# -P: the repository root stays off sys.path. Its kernels/ folder would shadow Hugging Face's `kernels` package, which
# transformers 5.25 installs and imports ("cannot import name 'CUDAProperties' from 'kernels'").
# -n 2: two workers (pytest-xdist), one thread each: most of a test's time is a single-threaded Python (a CLI process,
# imports), so two side by side take 0.6x the time; with torch's two threads each they would oversubscribe two cores.
# worksteal: a worker that runs out of tests takes queued ones from the other (the slowest tests come last).
OMP_NUM_THREADS=1 .venv/bin/python -P -m pytest -q -n 2 --dist worksteal "$@"
if [ $# -eq 0 ]; then
  wait $vllm_setup || { cat "$vllm_log"; echo "scripts/setup_vllm.sh failed" >&2; exit 1; }
  # loadscope: a module's tests stay on one worker, which builds its exports and engine once (vllm_helpers.py binds
  # each worker's engines to a core of their own)
  .venv-vllm/bin/python -P -m pytest -q -n 2 --dist loadscope tests/vllm_plugin
fi
