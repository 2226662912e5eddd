#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite on the real SmolLM2-135M weights and Wikipedia text; then the
# vLLM plugin's tests under vLLM's CPU build (.venv-vllm). set -e: the first failing run fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# -P: the repository root stays off sys.path. Its kernels/ folder would shadow Hugging Face's `kernels` package, which
# transformers 5.25 installs and imports ("cannot import name 'CUDAProperties' from 'kernels'").
.venv/bin/python -P -m pytest -q "$@"
# The vLLM plugin's tests (tests/vllm_plugin/) run under vLLM's CPU build, in .venv-vllm (built on first use; see
# setup_vllm.sh); with arguments, only the tests they name run, in .venv.
if [ $# -eq 0 ]; then
  bash scripts/setup_vllm.sh
  .venv-vllm/bin/python -P -m pytest -q tests/vllm_plugin
fi
