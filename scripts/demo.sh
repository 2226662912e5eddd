#!/usr/bin/env bash
# Set up .venv, export the embedded SmolLM2-135M-Instruct at 50% ActTail sparsity, load the checkpoint in a fresh
# process (trust_remote_code) and generate, then compare dense and sparse perplexity on a few windows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=out/smollm2-acttail-50
.venv/bin/acttail-export export "$OUT" --sparsity 0.5 --overwrite
echo "--- generate (fresh process, AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
.venv/bin/acttail-export generate "$OUT" --prompt "Explain in two sentences what a printing press does."
echo "--- perplexity"
.venv/bin/acttail-export eval "$OUT" --windows 4 --seqlen 512 --dense-baseline
