"""Per-projection sparsity under a global, parameter-weighted budget, rounded to exact TopK counts.

The sparsities come from alpha (``acttail``, ``block``), are uniform, come from TEAL's block-wise greedy rows
(``teal-greedy``, searched in greedy.py), or from loss-increase curves measured on calibration text (``calibrated``,
fisher.py). ``sites`` limits which projections are sparsified; the budget always counts the
parameters of all seven projections, so the effective sparsity is comparable across sites.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .errors import BadOption, ExportError
from .modeling.projections import SITES
from .weights import Projection

__all__ = [
    "ALLOCATIONS",
    "SITES",
    "GREEDY_TOLERANCE",
    "DEFAULT_EPSILON",
    "DEFAULT_SPARSER",
    "DIRECTIONS",
    "BUDGET_TOLERANCE",
    "ModuleSparsity",
    "GreedyRow",
    "check_bounds",
    "site_projections",
    "site_target",
    "keep_count",
    "keep_range",
    "effective_sparsity",
    "allocate",
]

ALLOCATIONS = ("acttail", "uniform", "block", "teal-greedy", "calibrated")
DIRECTIONS = ("heavy-tail", "light-tail")
# Defaults chosen from docs/RESULTS.md (SmolLM2-135M, every token sparse).
DEFAULT_EPSILON = 0.3
DEFAULT_SPARSER = "heavy-tail"
BUDGET_TOLERANCE = 0.002
# teal-greedy: the rows each block picks must bring the (unrounded) sparsity this close to the target.
GREEDY_TOLERANCE = 0.005


@dataclass(frozen=True)
class ModuleSparsity:
    """What one projection keeps: ``keep`` of its ``in_features`` inputs per token."""

    alpha: float
    keep: int
    in_features: int
    out_features: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.in_features

    def to_dict(self) -> dict:
        return {"alpha": round(self.alpha, 4), "sparsity": round(self.sparsity, 4), "keep": self.keep,
                "in_features": self.in_features}


@dataclass(frozen=True)
class GreedyRow:
    """One row of a block's greedy search: the block's parameter-weighted sparsity and each projection kind's sparsity."""

    block_sparsity: float
    sparsity: dict[str, float]  # kind ("q" ... "down") -> s


def keep_count(sparsity: float, in_features: int) -> int:
    """k_p = clamp(round((1 - s_p) * d_in), 1, d_in)."""
    return min(max(round((1.0 - sparsity) * in_features), 1), in_features)


def keep_range(in_features: int, s_min: float, s_max: float) -> tuple[int, int]:
    """The fewest and the most inputs a projection may keep for its sparsity to lie in [s_min, s_max]: ceil((1 - s_max)
    d_in) and floor((1 - s_min) d_in), rounded inward so that no count breaks a bound (after rounding to 9 decimals:
    (1 - 0.7) * 10 is 3.0000000000000004); refused where no count fits."""
    fewest = max(math.ceil(round((1.0 - s_max) * in_features, 9)), 1)
    most = min(math.floor(round((1.0 - s_min) * in_features, 9)), in_features)
    if fewest > most:
        raise ExportError(f"no TopK count of a projection with {in_features} inputs gives a sparsity between "
                          f"--min-sparsity {s_min} and --max-sparsity {s_max}: widen them")
    return fewest, most


def effective_sparsity(modules: dict[str, ModuleSparsity]) -> float:
    """sum_p n_p (1 - k_p / d_in) / sum_p n_p: the fraction of projection weights a decode step skips."""
    params = sum(m.out_features * m.in_features for m in modules.values())
    skipped = sum(m.out_features * (m.in_features - m.keep) for m in modules.values())
    return skipped / params


def check_bounds(target: float, s_min: float, s_max: float) -> None:
    """The target and the clip bounds must satisfy 0 <= s_min <= target <= s_max < 1."""
    if not 0.0 <= target < 1.0:
        raise BadOption(f"sparsity must be in [0, 1), got {target}")
    if not 0.0 <= s_min <= target <= s_max < 1.0:
        raise BadOption(f"need 0 <= --min-sparsity ({s_min}) <= --sparsity ({target}) <= --max-sparsity ({s_max}) < 1")


def site_projections(projections, sites: str) -> list[Projection]:
    """The projections that ``sites`` sparsifies, in their order."""
    if sites not in SITES:
        raise ExportError(f"unknown sites {sites!r}; choose from {', '.join(SITES)}")
    return [p for p in projections if p.kind in SITES[sites]]


def site_target(projections, target: float, sites: str, s_max: float) -> float:
    """The mean sparsity the sparsified projections need so that the mean over *all* projection parameters is ``target``;
    refused if it exceeds ``s_max``."""
    chosen = site_projections(projections, sites)
    share = sum(p.params for p in chosen) / sum(p.params for p in projections)
    needed = target / share
    if needed > s_max + 1e-9:  # a float share can put a reachable target a rounding error above s_max
        raise ExportError(f"sparsity {target} cannot be reached with --sites {sites}: those projections hold {share:.1%} "
                          f"of the projection weights, so they would need {needed:.3f} > --max-sparsity {s_max}")
    return min(needed, s_max)


def _solve_linear_rule(scores: np.ndarray, params: np.ndarray, target: float, epsilon: float,
                       s_min: float, s_max: float) -> np.ndarray:
    """s_p = clip(eta * ((1 - eps) + 2 eps r_p), s_min, s_max) with eta bisected so that the weighted mean is ``target``.

    :param scores: r_p in [0, 1], 1 = gets the most sparsity
    """
    base = (1.0 - epsilon) + 2.0 * epsilon * scores

    def mean_sparsity(eta: float) -> float:
        return float(np.average(np.clip(eta * base, s_min, s_max), weights=params))

    high = 1.0
    # with a tolerance: every projection at s_max = target averages to 0.8999999999999999 for 0.9
    while mean_sparsity(high) < target - 1e-9:
        high *= 2
        if high > 1e9:
            raise ExportError(f"sparsity {target} cannot be reached with epsilon={epsilon}, min sparsity {s_min} and "
                              f"max sparsity {s_max}: too many projections are pinned at a bound")
    low = 0.0
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if mean_sparsity(mid) < target else (low, mid)
    return np.clip(high * base, s_min, s_max)


def _round_to_budget(sparsity: np.ndarray, projections: list[Projection], target: float,
                     s_min: float, s_max: float) -> np.ndarray:
    """Integer keep counts within each projection's :func:`keep_range`, whose effective sparsity is within
    BUDGET_TOLERANCE of ``target`` where single-step changes can bring it there; counts that already are stay as rounded
    (so ``uniform`` stays uniform per input width)."""
    d_in = np.array([p.in_features for p in projections])
    d_out = np.array([p.out_features for p in projections])
    wanted = (1.0 - sparsity) * d_in
    keep_min, keep_max = np.array([keep_range(d, s_min, s_max) for d in d_in]).T
    keep = np.clip([keep_count(s, d) for s, d in zip(sparsity, d_in)], keep_min, keep_max)
    total = float((d_out * d_in).sum())
    excess = float((d_out * (d_in - keep)).sum()) - target * total  # skipped minus wanted params
    while abs(excess) > BUDGET_TOLERANCE * total:
        # Too sparse: raise a keep count, too dense: lower one; among the moves that bring the budget closer, take the
        # projection whose rounding went furthest the other way.
        step = 1 if excess > 0 else -1
        movable = (keep < keep_max) if step > 0 else (keep > keep_min)
        helps = movable & (np.abs(excess - step * d_out) < abs(excess))
        if not helps.any():
            break
        i = int(np.argmax(np.where(helps, (wanted - keep) * step, -np.inf)))
        keep[i] += step
        excess -= step * d_out[i]
    return keep


def _scores(projections: list[Projection], alphas: dict[str, float], method: str, sparser: str) -> np.ndarray:
    """r_p in [0, 1] from alpha (or the block's mean alpha), oriented so that 1 means sparsest."""
    alpha = np.array([alphas[p.name] for p in projections])
    if method == "block":
        by_layer = defaultdict(list)
        for p, a in zip(projections, alpha):
            by_layer[p.layer].append(a)
        alpha = np.array([np.mean(by_layer[p.layer]) for p in projections])
    spread = alpha.max() - alpha.min()
    r = (alpha - alpha.min()) / spread if spread > 0 else np.full_like(alpha, 0.5)
    # heavy-tail: the smallest alpha (heaviest tail) gets the most sparsity; light-tail (AlphaPruning) the reverse.
    return 1.0 - r if sparser == "heavy-tail" else r


def _greedy_sparsity(projections: list[Projection], rows: dict[int, list[GreedyRow]], target: float,
                     all_params: float) -> np.ndarray:
    """Each block takes its row closest to ``target``; the result must meet the budget within GREEDY_TOLERANCE."""
    missing = sorted({p.layer for p in projections} - set(rows))
    if missing:
        raise ExportError(f"teal-greedy has no rows for layers {missing}")
    picked = {layer: min(layer_rows, key=lambda row: abs(row.block_sparsity - target)) for layer, layer_rows in rows.items()}
    sparsity = np.array([picked[p.layer].sparsity[p.kind] for p in projections])
    reached = float(np.dot([p.params for p in projections], sparsity)) / all_params
    if abs(reached - target) > GREEDY_TOLERANCE + 1e-9:  # a target half-way between rows is exactly step / 2 off
        lowest_end = min(layer_rows[-1].block_sparsity for layer_rows in rows.values())
        raise ExportError(f"teal-greedy rows reach sparsity {reached:.4f}, more than {GREEDY_TOLERANCE} from the target "
                          f"{target} (the lowest last row is at {lowest_end:.3f}): use a smaller --greedy-step")
    return sparsity


def allocate(projections: list[Projection] | tuple[Projection, ...], alphas: dict[str, float], target: float,
             method: str = "acttail", epsilon: float = DEFAULT_EPSILON, sparser: str = DEFAULT_SPARSER,
             s_min: float = 0.0, s_max: float = 0.99, sites: str = "all",
             greedy_rows: dict[int, list[GreedyRow]] | None = None,
             calibrated: dict[str, float] | None = None) -> dict[str, ModuleSparsity]:
    """Choose each projection's TopK count so that the parameter-weighted sparsity is ``target`` (within rounding).

    :param alphas: Hill alpha per module name (recorded for every method; used by ``acttail`` and ``block``)
    :param target: S, the mean sparsity over all projection parameters, in [0, 1)
    :param method: ``acttail`` (linear rule on alpha), ``uniform`` (s_p = S), ``block`` (linear rule on the block mean
        alpha), ``teal-greedy`` (each block's row of ``greedy_rows`` closest to S)
    :param epsilon: spread of the linear rule: sparsities lie in eta * [1 - eps, 1 + eps] before clipping
    :param sparser: ``heavy-tail`` gives small alpha more sparsity, ``light-tail`` large alpha (AlphaPruning's direction)
    :param s_min: lower clip of each sparsified projection's sparsity
    :param s_max: upper clip of each projection's sparsity
    :param sites: ``all`` or ``mlp`` (see SITES); the other projections keep every input, and the budget still counts them
    :param greedy_rows: for ``teal-greedy``: per layer, the rows of :func:`acttail_export.greedy.search_block`
    :param calibrated: for ``calibrated``: each sparsified projection's sparsity (see
        :func:`acttail_export.fisher.calibrated_sparsity`), rounded here like the others
    """
    if method not in ALLOCATIONS:
        raise ExportError(f"unknown allocation {method!r}; choose from {', '.join(ALLOCATIONS)}")
    if sparser not in DIRECTIONS:
        raise ExportError(f"unknown direction {sparser!r}; choose from {', '.join(DIRECTIONS)}")
    if not 0.0 <= epsilon <= 1.0:
        raise ExportError(f"epsilon must be in [0, 1], got {epsilon}")
    if method == "teal-greedy" and greedy_rows is None:
        raise ExportError("allocation teal-greedy needs the greedy rows (see acttail_export.greedy)")
    if method == "calibrated" and calibrated is None:
        raise ExportError("allocation calibrated needs the calibrated sparsities (see acttail_export.fisher)")
    check_bounds(target, s_min, s_max)
    projections = list(projections)
    chosen = site_projections(projections, sites)
    chosen_target = site_target(projections, target, sites, s_max)
    params = np.array([p.params for p in chosen], dtype=np.float64)
    if method == "uniform":
        sparsity = np.full(len(chosen), chosen_target)
    elif method == "teal-greedy":
        sparsity = _greedy_sparsity(chosen, greedy_rows, target, float(sum(p.params for p in projections)))
    elif method == "calibrated":
        sparsity = np.array([calibrated[p.name] for p in chosen])
    else:
        sparsity = _solve_linear_rule(_scores(chosen, alphas, method, sparser), params, chosen_target, epsilon, s_min, s_max)
    keep = dict(zip((p.name for p in chosen), _round_to_budget(sparsity, chosen, chosen_target, s_min, s_max)))
    modules = {
        p.name: ModuleSparsity(float(alphas[p.name]), int(keep.get(p.name, p.in_features)), p.in_features, p.out_features)
        for p in projections
    }
    achieved = effective_sparsity(modules)
    if abs(achieved - target) > BUDGET_TOLERANCE:
        raise ExportError(f"effective sparsity {achieved:.4f} misses the target {target} by more than {BUDGET_TOLERANCE} "
                          "(the model is too small for integer TopK counts within --min-sparsity and --max-sparsity "
                          "to meet it)")
    return modules
