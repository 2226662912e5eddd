"""The ``calibrated`` allocation: per projection, a Fisher estimate of the loss increase as a function of its sparsity,
from forward and backward passes over calibration windows; the budget is split where every projection's marginal
cost per skipped parameter is equal (a Lagrangian over those curves).

For projection p with input x_t (token t), weight W_p and loss gradient g_t at p's output, dropping the inputs D_t
changes the output by -W_p[:, D_t] x_t[D_t], and the loss, to first order, by -(u_t . x_t restricted to D_t) with
u_t = W_p^T g_t (the gradient at p's input). The Fisher estimate of the loss increase is
C_p(j) = sum_t (sum_{i in D_t(j)} u_ti x_ti)^2, with D_t(j) the j inputs TopK drops (the j smallest |x_ti| of token t).
The curve comes out at every j at once from one sort and one cumulative sum per projection, and as a sum over tokens it
adds up over calibration windows. Threshold mode splits its budget on the same TopK curves, then calibrates a threshold
at each projection's sparsity: on SmolLM2 that beat curves of a global |x| quantile on two texts at 30, 50 and 70%
(docs/RESULTS.md). (The curves of the relative output error ||W (x - x_kept)||^2 / ||W x||^2
alone gave an allocation worse than uniform: the loss gradient is what makes them comparable across projections.)
"""

from __future__ import annotations

import numpy as np
import torch

from .allocation import keep_range

# Weight of ActTail's allocation (from alpha) blended into the calibrated one; chosen in docs/RESULTS.md.
DEFAULT_PRIOR = 0.25

__all__ = ["DEFAULT_PRIOR", "topk_curves", "split_budget", "calibrated_sparsity"]


def topk_curves(x: torch.Tensor, us: list[torch.Tensor]) -> list[np.ndarray]:
    """C(j) for j = 0 ... d_in dropped inputs per token under TopK, for each projection reading x (one ranking).

    :param x: the projections' input ``[tokens, d_in]``
    :param us: per projection, the loss gradient at its input, W^T g, ``[tokens, d_in]``
    """
    order = torch.from_numpy(_stable_order(x.detach().abs()))  # ascending |x|: TopK drops a prefix of this order
    curves = []
    for u in us:
        dropped = (u * x).gather(-1, order).double().cumsum(-1)  # [tokens, d_in]: the first-order loss change
        curves.append(np.concatenate([[0.0], dropped.pow(2).sum(0).numpy()]))
    return curves


def _stable_order(values: torch.Tensor) -> np.ndarray:
    """The ascending stable order of non-negative ``values`` along their last dimension (torch's
    ``argsort(stable=True)``), as one numpy sort of int64 keys (a float32's bits above its index): 3-10x faster than a
    stable argsort, which made the curves most of a calibrated export's time."""
    bits = values.float().numpy().view(np.int32).astype(np.int64)  # non-negative floats order as their bits
    return np.sort(bits << 32 | np.arange(values.shape[-1], dtype=np.int64), axis=-1) & 0xFFFFFFFF


def _choice(curves: list[np.ndarray], weights: np.ndarray, lo: np.ndarray, hi: np.ndarray, lam: float) -> np.ndarray:
    """Each curve's j in [lo, hi] minimising C(j) - lam * weight * j."""
    return np.array([lo_p + int(np.argmin(c[lo_p:hi_p + 1] - lam * w * np.arange(lo_p, hi_p + 1)))
                     for c, w, lo_p, hi_p in zip(curves, weights, lo, hi)])


def split_budget(curves: list[np.ndarray], weights: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 target: float) -> np.ndarray:
    """Dropped counts j_p minimising sum_p C_p(j_p) with sum_p weights_p j_p = ``target`` (to within one count).

    A multiplier lam prices a skipped parameter; each curve then takes its j where its marginal cost is lam (on the
    curve's lower convex hull). lam is bisected; the projections whose choice changes inside the last interval are
    moved, cheapest marginal cost first, until the budget is met.

    :param curves: C_p over j = 0 ... d_in
    :param weights: parameters skipped per dropped input (d_out of p)
    :param lo: fewest dropped inputs of p (from the max keep); ``hi`` the most
    :param target: parameters to skip
    """
    # lam = +-scale exceeds any curve's rise or fall over [lo, hi] per skipped parameter, so at -scale every curve takes
    # its lo and at +scale its hi (a curve, a sum over tokens of squared running sums, is not monotone: it can dip
    # inside [lo, hi] or rise above its value at d_in, so 0 and max C(d_in) are not the bounds)
    span = max(float(c[lo_p:hi_p + 1].max() - c[lo_p:hi_p + 1].min()) for c, lo_p, hi_p in zip(curves, lo, hi))
    scale = 2 * max(span, 1e-30) / float(weights.min())
    low, high = -scale, scale
    for _ in range(100):
        mid = (low + high) / 2
        if float(weights @ _choice(curves, weights, lo, hi, mid)) < target:
            low = mid
        else:
            high = mid
    chosen = _choice(curves, weights, lo, hi, low)
    upper = _choice(curves, weights, lo, hi, high)
    need = target - float(weights @ chosen)
    # between the two multipliers some curves jump; fill the gap with those jumps, the cheapest per parameter first
    moving = [p for p in range(len(curves)) if upper[p] > chosen[p]]
    moving.sort(key=lambda p: (curves[p][upper[p]] - curves[p][chosen[p]]) / (weights[p] * (upper[p] - chosen[p])))
    for p in moving:
        if need <= 0:
            break
        step = min(upper[p] - chosen[p], int(round(need / weights[p])))
        chosen[p] += step
        need -= step * weights[p]
    return chosen


def calibrated_sparsity(projections, curves: dict[str, np.ndarray], target: float, s_min: float, s_max: float,
                        prior: dict[str, float] | None = None, prior_weight: float = 0.0) -> dict[str, float]:
    """Each projection's sparsity from its curve, so that the parameter-weighted mean is ``target``.

    :param projections: the sparsified projections
    :param curves: C_p over j = 0 ... d_in dropped inputs
    :param target: their mean sparsity (weighted by parameters)
    :param prior: another allocation of the same budget (ActTail's, from alpha), blended in with ``prior_weight``
    """
    d_in = np.array([p.in_features for p in projections])
    weights = np.array([float(p.out_features) for p in projections])
    keep_min, keep_max = np.array([keep_range(d, s_min, s_max) for d in d_in]).T
    lo, hi = d_in - keep_max, d_in - keep_min  # dropped counts, rounded inward
    dropped = split_budget([curves[p.name] for p in projections], weights, lo, hi, target * float(weights @ d_in))
    sparsity = dropped / d_in
    if prior is not None and prior_weight > 0:
        sparsity = (1 - prior_weight) * sparsity + prior_weight * np.array([prior[p.name] for p in projections])
    return {p.name: float(s) for p, s in zip(projections, sparsity)}
