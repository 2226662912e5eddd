#!/usr/bin/env bash
# Set up .venv (see setup.sh) and run the whole test suite on the real SmolLM2-135M weights and Wikipedia text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
