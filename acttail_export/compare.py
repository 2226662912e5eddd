"""Perplexity of every sparsification method at several sparsities, on the same evaluation windows of the same model.

The model is built once, in this process, by the ActTail runtime every checkpoint ships; each (method, sparsity, prefill)
applies its block with ``set_activation_sparsity``, so every row runs the modeling code a user would. Calibration (thresholds, the greedy
search, the auto-tuning search) uses windows from the end of the calibration text, evaluation windows from the start of
the evaluation text: with one text for both, ``acttail-export compare`` refuses windows that would overlap
(:func:`acttail_export.evaluate.check_disjoint`).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from .calibration import Calibration
from .errors import ExportError
from .evaluate import dense_block, load_in_process, perplexity, zeroed_inputs
from .methods import Method, build_block
from .spectra import ESTIMATORS, estimator_alphas
from .tuning import tune_block
from .weights import SourceModel

__all__ = ["METHODS", "Result", "calibrates", "compare", "format_markdown", "write_csv", "plot_results"]

# name -> how its block is built; "dense" and "auto" are special.
METHODS: dict[str, Method | str] = {
    "dense": "dense",
    "uniform": Method("uniform"),
    "block": Method("block"),
    "acttail": Method(),
    "auto": "auto",  # ActTail with estimator, direction and epsilon chosen on calibration windows (tuning.py)
    "teal-greedy": Method("teal-greedy"),  # TEAL's block-wise greedy allocation, exact TopK counts
    "teal": Method("teal-greedy", "threshold"),  # TEAL as published: greedy allocation, calibrated thresholds
    "teal-uniform": Method("uniform", "threshold"),  # TEAL's thresholds without its allocation
    "ffn-only": Method("uniform", "threshold", sites="mlp"),  # Dhar et al.: percentile thresholds, FFN inputs only
    "calibrated": Method("calibrated"),  # Fisher loss-increase curves (fisher.py), TopK counts
    "calibrated-threshold": Method("calibrated", "threshold"),  # the same split, thresholds calibrated at it
    "calibrated-no-alpha": Method("calibrated", prior=0.0),  # ablations: the curves alone, without ActTail's alpha
    "calibrated-threshold-no-alpha": Method("calibrated", "threshold", prior=0.0),
}


@dataclass(frozen=True)
class Result:
    method: str
    sparsity: float
    prefill: str | float
    effective_sparsity: float
    perplexity: float
    # threshold rows with every token sparse: the fraction of inputs zeroed on the evaluation windows, which the
    # thresholds (calibrated on other windows) only approximate to the target
    measured_sparsity: float | None = None


def calibrates(method: str) -> bool:
    """Whether the method ``method`` names runs the model on calibration windows (thresholds, greedy, curves, auto)."""
    return METHODS[method] == "auto" or (isinstance(METHODS[method], Method) and METHODS[method].needs_calibration)


def compare(source: SourceModel, sparsities: list[float], methods: list[str], prefills: list[str | float],
            eval_ids, calibration_ids=None, log=print) -> list[Result]:
    """Every method x sparsity x prefill on ``eval_ids`` (``[windows, seqlen]``); ``log`` gets one line per result.

    :param calibration_ids: ``[windows, seqlen]`` calibration token ids (see
        :func:`acttail_export.evaluate.calibration_windows`), needed only by the methods that :func:`calibrates`
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExportError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if calibration_ids is None and any(map(calibrates, methods)):
        raise ExportError(f"methods {', '.join(filter(calibrates, methods))} need calibration windows")
    model = load_in_process(source)
    alphas = estimator_alphas(source, ESTIMATORS)  # each estimator's alphas as export writes them
    calibration = None
    if any(calibrates(m) and METHODS[m] != "auto" for m in methods):
        calibration = Calibration(source, calibration_ids, "calibration text")
    results = []

    def measure(name: str, target: float, block: dict) -> None:
        for prefill in prefills:
            model.set_activation_sparsity({**block, "prefill": prefill})
            measured = None
            if block.get("mode") == "threshold" and prefill == "sparse":
                with zeroed_inputs(model) as fraction:
                    ppl = perplexity(model, eval_ids, progress=False)
                    measured = fraction()
            else:
                ppl = perplexity(model, eval_ids, progress=False)
            results.append(Result(name, target, prefill, block["effective_sparsity"], ppl, measured))
            effective = f"effective {block['effective_sparsity']:.3f}" + (
                "" if measured is None else f", measured {measured:.3f}")
            log(f"{name:13s} sparsity {target:.2f} ({effective}) prefill {prefill!s:6s} perplexity {ppl:10.3f}")

    for name in methods:
        method = METHODS[name]
        for target in sparsities:
            if method == "dense":
                block, _ = build_block(source, 0.0, Method("uniform"), alphas["mid"])
                measure(name, 0.0, dense_block(block))
                break
            if method == "auto":
                block = tune_block(model, source.projections, alphas, target, calibration_ids, text="calibration text")
            else:
                block, _ = build_block(source, target, method, alphas[method.estimator], calibration)
            measure(name, target, block)
    return results


def format_markdown(results: list[Result]) -> str:
    """One table per prefill policy: methods as rows, sparsities as columns; a threshold row with every token sparse
    gives the sparsity measured on the evaluation windows beside each perplexity."""
    out = io.StringIO()
    for prefill in dict.fromkeys(r.prefill for r in results):
        rows = [r for r in results if r.prefill == prefill]
        targets = sorted({r.sparsity for r in rows if r.method != "dense"})
        out.write(f"\nprefill `{prefill}`\n\n| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |\n")
        out.write("|---|" + "---:|" * len(targets) + "\n")
        for method in dict.fromkeys(r.method for r in rows):
            cells = {r.sparsity: f"{r.perplexity:.2f}" + ("" if r.measured_sparsity is None else
                                                          f" (measured {r.measured_sparsity:.3f})")
                     for r in rows if r.method == method}
            if method == "dense":
                out.write(f"| dense | {cells[0.0]} (every column) |" + " |" * (len(targets) - 1) + "\n")
                continue
            out.write(f"| {method} | " + " | ".join(cells.get(t, "-") for t in targets) + " |\n")
    return out.getvalue()


def write_csv(results: list[Result], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "target_sparsity", "prefill", "effective_sparsity", "perplexity",
                         "measured_sparsity"])
        for r in results:
            writer.writerow([r.method, r.sparsity, r.prefill, f"{r.effective_sparsity:.6f}", f"{r.perplexity:.6f}",
                             "" if r.measured_sparsity is None else f"{r.measured_sparsity:.6f}"])


def plot_results(results: list[Result], path: Path, title: str) -> None:
    """Per prefill policy, perplexity against target sparsity (log scale), one line per method; below it, when
    ``uniform`` was measured, each method's perplexity as a ratio to uniform's at the same sparsity (one line no longer
    squeezes the others)."""
    from matplotlib.figure import Figure

    prefills = list(dict.fromkeys(r.prefill for r in results))
    uniform = {(r.prefill, r.sparsity): r.perplexity for r in results if r.method == "uniform"}
    views = 2 if uniform else 1
    fig = Figure(figsize=(6 * len(prefills), 4.5 * views))
    axes = fig.subplots(views, len(prefills), squeeze=False)
    for column, prefill in enumerate(prefills):
        rows = [r for r in results if r.prefill == prefill]
        ax = axes[0][column]
        for method in dict.fromkeys(r.method for r in rows):
            points = sorted((r.sparsity, r.perplexity) for r in rows if r.method == method)
            if method == "dense":
                ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label="dense")
            else:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_ylabel("token perplexity")
        if views == 2:
            ratio = axes[1][column]
            for method in dict.fromkeys(r.method for r in rows if r.method != "dense"):
                points = sorted((r.sparsity, r.perplexity / uniform[prefill, r.sparsity]) for r in rows
                                if r.method == method and (prefill, r.sparsity) in uniform)
                if points:
                    ratio.plot(*zip(*points), marker="o", label=method)
            ratio.axhline(1.0, color="black", linewidth=1)
            ratio.set_ylabel("perplexity / uniform's")
        for ax in axes[:, column]:
            ax.set_yscale("log")
            ax.set_xlabel("target sparsity (fraction of projection weights skipped)")
            ax.set_title(f"prefill {prefill}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
