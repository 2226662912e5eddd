#!/usr/bin/env bash
# Set up .venv, export the embedded SmolLM2-135M-Instruct at 50% sparsity with the default allocation, calibrated on the
# bundled text (measuring dense and sparse perplexity into the model card, beside its figures), then load the checkpoint
# in a fresh process (trust_remote_code) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=out/smollm2-calibrated-50
.venv/bin/acttail-export export "$OUT" --sparsity 0.5 --eval --overwrite
echo "--- model card: $OUT/README.md, figures: $OUT/figures/"
echo "--- generate (fresh process, AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
.venv/bin/acttail-export generate "$OUT" --prompt "Explain in two sentences what a printing press does."
