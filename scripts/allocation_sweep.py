"""Perplexity of SmolLM2-135M under dense, uniform, block and ActTail allocations (estimators x directions x epsilons).

Takes each estimator's alphas from the spectra an export with that estimator uses (``spectra.estimator_alphas``: float32
for mid and ks, float64 for peak), builds the model once in this process with the runtime every checkpoint ships, and for
each variant applies that variant's activation_sparsity block with ``set_activation_sparsity``: every row runs the
same modeling code a user would, on the same windows. Prints a Markdown table (used for docs/RESULTS.md).

    .venv/bin/python scripts/allocation_sweep.py --windows 6 --seqlen 512 > /tmp/sweep.md

Research options: ``--normalizations`` maps alpha before the allocation's global min-max (``per-kind``: min-max within each
projection kind q/k/v/o/gate/up/down; ``kind-mean``: the kind's mean alpha only; ``rank``: global rank; ``log``: log alpha),
``--min-sparsities`` / ``--max-sparsities`` add clip bounds, ``--no-baselines`` skips the uniform and block rows, and ``--auto`` adds the
``--epsilon auto`` row: tuned on calibration windows from the end of the text, reported on the evaluation windows.

    .venv/bin/python scripts/allocation_sweep.py --sparsities 0.5,0.7 --estimators mid --sparsers heavy-tail \\
        --epsilons 0.3 --normalizations global,per-kind,kind-mean,rank,log --no-baselines
"""

import argparse
import itertools
import sys

import numpy as np

from acttail_export.allocation import DEFAULT_EPSILON, DEFAULT_SPARSER, DIRECTIONS, allocate
from acttail_export.checkpoint import sparsity_block
from acttail_export.evaluate import calibration_windows, dense_block, load_in_process, load_tokenizer, perplexity, tokenize_windows
from acttail_export.spectra import DEFAULT_ESTIMATOR, ESTIMATORS, estimator_alphas
from acttail_export.text import read_text
from acttail_export.tuning import tune_block
from acttail_export.weights import resolve_model


def _by_kind(alphas: dict[str, float], reduce) -> dict[str, float]:
    kinds = {name: name.rsplit(".", 1)[-1] for name in alphas}
    out = {}
    for kind in set(kinds.values()):
        names = [n for n in alphas if kinds[n] == kind]
        out.update(zip(names, reduce(np.array([alphas[n] for n in names]))))
    return out


def _minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


# Maps of the alphas fed to the allocation's global min-max r_p (research variants; the exporter uses "global").
NORMALIZATIONS = {
    "global": lambda alphas: alphas,
    "per-kind": lambda alphas: _by_kind(alphas, _minmax),
    "kind-mean": lambda alphas: _by_kind(alphas, lambda a: np.full_like(a, a.mean())),
    "rank": lambda alphas: dict(zip(alphas, np.argsort(np.argsort(list(alphas.values()))).astype(float))),
    "log": lambda alphas: {name: float(np.log(a)) for name, a in alphas.items()},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sparsities", default="0.3,0.5,0.7")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--sparsers", default=",".join(DIRECTIONS))
    parser.add_argument("--epsilons", default="0.1,0.3,0.5")
    parser.add_argument("--normalizations", default="global")
    parser.add_argument("--min-sparsities", default="0")
    parser.add_argument("--max-sparsities", default="0.99")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--auto", action="store_true", help="add the --epsilon auto row")
    parser.add_argument("--calibration-windows", type=int, default=4)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--prefill", default="sparse")
    args = parser.parse_args()
    prefill = args.prefill if args.prefill in ("sparse", "dense") else float(args.prefill)
    split = lambda value, cast=str: [cast(v) for v in value.split(",")]  # noqa: E731

    source = resolve_model(None)
    alphas = estimator_alphas(source, ESTIMATORS)
    model, tokenizer = load_in_process(source), load_tokenizer(source.folder)
    text = read_text(None)
    ids = tokenize_windows(tokenizer, text, args.seqlen, args.windows)

    def measure(block) -> float:
        model.set_activation_sparsity({**block, "prefill": prefill})
        return perplexity(model, ids, progress=False)

    def fixed(target, method, estimator=DEFAULT_ESTIMATOR, epsilon=DEFAULT_EPSILON, sparser=DEFAULT_SPARSER,
              normalization="global", s_min=0.0, s_max=0.99) -> float:
        mapped = NORMALIZATIONS[normalization](alphas[estimator])
        modules = allocate(source.projections, mapped, target, method, epsilon, sparser, s_min, s_max)
        return measure(sparsity_block(modules, target, method, estimator, epsilon, sparser))

    def auto(target) -> tuple[float, str]:
        windows = calibration_windows(tokenizer, text, args.seqlen, args.calibration_windows)
        block = tune_block(model, source.projections, alphas, target, windows)
        chosen = block["tuning"]["chosen"]
        return measure(block), f"{chosen['estimator']}/{chosen['sparser']}/{chosen['epsilon']}"

    uniform = allocate(source.projections, alphas[DEFAULT_ESTIMATOR], 0.5, "uniform")
    dense = measure(dense_block(sparsity_block(uniform, 0.5, "uniform", DEFAULT_ESTIMATOR, 0.0, DEFAULT_SPARSER)))
    sparsities = split(args.sparsities, float)
    print(f"SmolLM2-135M-Instruct, {args.windows} windows x {args.seqlen} tokens of the bundled Wikipedia text, "
          f"prefill={args.prefill}; dense perplexity {dense:.2f}\n")
    print("| allocation | estimator | sparser | epsilon | normalization | min / max sparsity | "
          + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|---|---:|---|---:|" + "---:|" * len(sparsities), flush=True)
    baselines = [("uniform", DEFAULT_ESTIMATOR, DEFAULT_SPARSER, 0.0, "global", 0.0, 0.99),
                 ("block", DEFAULT_ESTIMATOR, DEFAULT_SPARSER, DEFAULT_EPSILON, "global", 0.0, 0.99)]
    rows = [] if args.no_baselines else baselines
    rows += [("acttail", *row) for row in itertools.product(split(args.estimators), split(args.sparsers),
                                                            split(args.epsilons, float), split(args.normalizations),
                                                            split(args.min_sparsities, float),
                                                            split(args.max_sparsities, float))]
    for method, estimator, sparser, epsilon, normalization, s_min, s_max in rows:
        cells = [fixed(s, method, estimator, epsilon, sparser, normalization, s_min, s_max) for s in sparsities]
        if method == "uniform":
            estimator = sparser = epsilon = normalization = "-"
        print(f"| {method} | {estimator} | {sparser} | {epsilon} | {normalization} | {s_min} / {s_max} | "
              + " | ".join(f"{c:.2f}" for c in cells) + " |", flush=True)
    if args.auto:
        cells = [auto(s) for s in sparsities]
        print(f"| acttail auto ({args.calibration_windows} calibration windows) | | | | | | "
              + " | ".join(f"{ppl:.2f} ({chosen})" for ppl, chosen in cells) + " |", flush=True)
    print(f"\ncommand: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
