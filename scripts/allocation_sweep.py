"""Perplexity of SmolLM2-135M under dense, uniform, block and ActTail allocations (estimators x directions x epsilons).

Computes the spectra once, exports one checkpoint, loads it through the shipped code (trust_remote_code), and for each
variant applies that variant's activation_sparsity block with ``set_activation_sparsity``: every row runs the same
modeling code a user would, on the same windows. Prints a Markdown table (used for docs/RESULTS.md).

    .venv/bin/python scripts/allocation_sweep.py --windows 6 --seqlen 512 > /tmp/sweep.md
"""

import argparse
import itertools
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

from acttail_export.allocation import DEFAULT_EPSILON, DEFAULT_SPARSER, allocate
from acttail_export.card import model_card
from acttail_export.checkpoint import sparsity_block, write_checkpoint
from acttail_export.evaluate import dense_block, perplexity, tokenize_windows
from acttail_export.spectra import DEFAULT_ESTIMATOR, ESTIMATORS, alphas_from_spectra, compute_spectra
from acttail_export.text import read_text
from acttail_export.weights import resolve_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.3,0.5,0.7")
    parser.add_argument("--epsilons", default="0.1,0.3,0.5")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prefill", default="sparse")
    args = parser.parse_args()
    prefill = args.prefill if args.prefill in ("sparse", "dense") else float(args.prefill)

    source = resolve_model(None)
    spectra = compute_spectra(source, progress=False)
    alphas = {e: alphas_from_spectra(spectra, e) for e in ESTIMATORS}

    def block_for(target, method, estimator=DEFAULT_ESTIMATOR, epsilon=DEFAULT_EPSILON, sparser=DEFAULT_SPARSER):
        modules = allocate(source.projections, alphas[estimator], target, method, epsilon, sparser)
        return sparsity_block(modules, target, method, estimator, epsilon, sparser, prefill)

    with tempfile.TemporaryDirectory() as tmp:
        block = block_for(0.5, "uniform")
        folder = write_checkpoint(source, f"{tmp}/ckpt", block, model_card(source.origin, "sweep", block, {}))
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenize_windows(tokenizer, read_text(None), args.seqlen, args.windows)

    def measure(block) -> float:
        model.set_activation_sparsity(block)
        return perplexity(model, ids, progress=False)

    dense = measure(dense_block(block))
    print(f"SmolLM2-135M-Instruct, {args.windows} windows x {args.seqlen} tokens of the bundled Wikipedia text, "
          f"prefill={args.prefill}; dense perplexity {dense:.2f}\n")
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print("| allocation | estimator | sparser | epsilon | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|---|---:|" + "---:|" * len(sparsities))
    rows = [("uniform", "-", "-", "-")]
    rows += [("block", "mid", "heavy-tail", 0.3)]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows += [("acttail", e, d, eps) for e, d, eps in itertools.product(ESTIMATORS, ("heavy-tail", "light-tail"), epsilons)]
    for method, estimator, sparser, epsilon in rows:
        cells = []
        for s in sparsities:
            if method == "uniform":
                cells.append(measure(block_for(s, "uniform")))
            else:
                cells.append(measure(block_for(s, method, estimator, epsilon, sparser)))
        print(f"| {method} | {estimator} | {sparser} | {epsilon} | " + " | ".join(f"{c:.2f}" for c in cells) + " |",
              flush=True)


if __name__ == "__main__":
    main()
