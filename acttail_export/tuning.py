"""Auto-tuned ActTail (``--epsilon auto``): choose estimator, direction and epsilon by perplexity on calibration windows.

The search scores each candidate allocation with ``set_activation_sparsity`` on a model loaded once, each estimator's
alphas taken once from the spectra an export with that estimator uses: first uniform (epsilon 0) and a coarse grid of
every estimator x direction x :data:`COARSE_EPSILONS`, then epsilon refined by :data:`REFINE_STEP` on both sides of the
best. Every calibration token is sparse, whatever prefill the export asks for (a dense prefill would make every trial
score the dense model). The windows should come from
:func:`acttail_export.evaluate.calibration_windows`, disjoint from the evaluation windows, so that a tuned checkpoint is
not chosen on its own test tokens.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .allocation import DIRECTIONS, allocate
from .checkpoint import sparsity_block
from .errors import ExportError
from .evaluate import perplexity
from .weights import Projection

__all__ = ["COARSE_EPSILONS", "REFINE_STEP", "Trial", "tune_block"]

COARSE_EPSILONS = (0.1, 0.3, 0.5, 0.8)  # SmolLM2: best at 0.2-0.4, 0.7 and more far worse at 70% (docs/RESULTS.md)
REFINE_STEP = 0.1


@dataclass(frozen=True)
class Trial:
    """One scored setting of the search."""

    estimator: str
    sparser: str
    epsilon: float
    perplexity: float


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def tune_block(model, projections: Sequence[Projection], alphas: Mapping[str, dict[str, float]], target: float,
               windows: torch.Tensor, *, sparsers: Sequence[str] = DIRECTIONS,
               epsilons: Sequence[float] = COARSE_EPSILONS, s_min: float = 0.0, s_max: float = 0.99,
               sites: str = "all", prefill: str | float = "sparse", text: str = "calibration text",
               log: Callable[[str], None] = _stderr) -> dict:
    """The ``activation_sparsity`` block of the setting with the lowest calibration perplexity, with a ``tuning`` record.

    Leaves ``model`` with the last trial's block applied.

    :param model: an ActTail model (``set_activation_sparsity``), e.g. from :func:`acttail_export.evaluate.load_in_process`
    :param alphas: estimator -> alpha per projection name, for each estimator searched, from
        :func:`acttail_export.spectra.estimator_alphas` (each estimator's alphas from its own precision's spectra, as an
        export with that estimator writes them)
    :param windows: ``[N, seqlen]`` calibration token ids
    :param sparsers: the directions searched (default both)
    :param epsilons: the coarse epsilon grid; the best is then refined by +-:data:`REFINE_STEP`
    :param sites: which projections are sparsified (see allocation.SITES): the trials are the allocations an export with
        these sites writes
    :param prefill: prefill policy written into the returned block (trials always sparsify every token)
    :param text: where the calibration windows came from, for the record
    :param log: called with one line per trial
    """
    estimators = list(alphas)
    trials: dict[tuple[str, str, float], Trial | None] = {}

    def run(estimator: str, sparser: str, epsilon: float) -> None:
        epsilon = round(epsilon, 6)  # 0.3 - 0.1 is 0.19999999999999998
        key = (estimator, sparser, epsilon)
        if key in trials:
            return
        try:
            modules = allocate(projections, alphas[estimator], target, "acttail", epsilon, sparser, s_min, s_max, sites)
        except ExportError as e:  # e.g. clip bounds that pin too many projections at this spread
            trials[key] = None
            log(f"tune: estimator {estimator} sparser {sparser} epsilon {epsilon:.3f}: skipped ({e})")
            return
        model.set_activation_sparsity(sparsity_block(modules, target, "acttail", estimator, epsilon, sparser,
                                                     sites=sites))
        trials[key] = Trial(estimator, sparser, epsilon, perplexity(model, windows, progress=False))
        log(f"tune: estimator {estimator:4s} sparser {sparser:10s} epsilon {epsilon:.3f}  "
            f"calibration ppl {trials[key].perplexity:.3f}")

    def best() -> Trial:
        return min((t for t in trials.values() if t is not None), key=lambda t: t.perplexity)

    run(estimators[0], sparsers[0], 0.0)  # epsilon 0 is uniform: the search may conclude that no spread helps
    for estimator, sparser, epsilon in itertools.product(estimators, sparsers, epsilons):
        run(estimator, sparser, epsilon)
    coarse = best()
    for epsilon in (coarse.epsilon - REFINE_STEP, coarse.epsilon + REFINE_STEP):
        if 0.0 < epsilon <= 1.0:
            run(coarse.estimator, coarse.sparser, epsilon)
    chosen = best()
    modules = allocate(projections, alphas[chosen.estimator], target, "acttail", chosen.epsilon, chosen.sparser,
                       s_min, s_max, sites)
    tuning = {
        "mode": "auto",
        "objective": "token perplexity on calibration windows, every token sparse",
        "text": text,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "chosen": asdict(chosen),
        "trials": [asdict(t) for t in trials.values() if t is not None],
    }
    return sparsity_block(modules, target, "acttail", chosen.estimator, chosen.epsilon, chosen.sparser, prefill,
                          sites=sites, tuning=tuning)
