"""A sparsification method (allocation, runtime mode, sites and their settings) turned into an ``activation_sparsity``
block: the one path ``export`` and comparisons share.

TEAL = ``Method(allocation="teal-greedy", mode="threshold")``; TEAL without its greedy allocation = ``Method("uniform",
"threshold")``; Dhar et al. = ``Method("uniform", "threshold", sites="mlp")``; ActTail = ``Method()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .allocation import (ALLOCATIONS, DEFAULT_EPSILON, DEFAULT_SPARSER, SITES, ModuleSparsity, allocate,
                         site_projections, site_target)
from .calibration import Calibration
from .checkpoint import sparsity_block
from .errors import ExportError
from .fisher import DEFAULT_PRIOR, calibrated_sparsity
from .greedy import DEFAULT_STEP
from .modeling.activation_sparsity import MODES
from .spectra import DEFAULT_ESTIMATOR
from .weights import SourceModel

__all__ = ["Method", "build_block"]


@dataclass(frozen=True)
class Method:
    """How to sparsify, as the ``export`` options name it.

    :param allocation: see allocation.ALLOCATIONS
    :param mode: "topk" (exact counts) or "threshold" (calibrated magnitude thresholds at the allocated sparsities)
    :param sites: "all" or "mlp" (see allocation.SITES)
    :param greedy_step: teal-greedy: block sparsity added per accepted raise
    :param prior: calibrated: weight of ActTail's alpha allocation blended into the calibrated one (0: calibration only)
    """

    allocation: str = "acttail"
    mode: str = "topk"
    sites: str = "all"
    estimator: str = DEFAULT_ESTIMATOR
    epsilon: float = DEFAULT_EPSILON
    sparser: str = DEFAULT_SPARSER
    s_min: float = 0.0
    s_max: float = 0.99
    prefill: str | float = "sparse"
    greedy_step: float = DEFAULT_STEP
    prior: float = DEFAULT_PRIOR

    def __post_init__(self):
        for field, value, allowed in (("allocation", self.allocation, ALLOCATIONS), ("mode", self.mode, MODES),
                                      ("sites", self.sites, tuple(SITES))):
            if value not in allowed:
                raise ExportError(f"unknown {field} {value!r}; choose from {', '.join(allowed)}")

    @property
    def needs_calibration(self) -> bool:
        """Whether the method runs the dense model on calibration text (thresholds, or the greedy search)."""
        return self.mode == "threshold" or self.allocation in ("teal-greedy", "calibrated")


def build_block(source: SourceModel, target: float, method: Method, alphas: dict[str, float],
                calibration: Calibration | None = None) -> tuple[dict, dict[str, ModuleSparsity]]:
    """The ``activation_sparsity`` block of ``method`` at target sparsity S, and the per-projection allocation behind it.

    Apply it to a loaded ActTail model with ``model.set_activation_sparsity(block)``, or write it with
    :func:`acttail_export.checkpoint.write_checkpoint`.

    :param alphas: Hill alpha per projection under ``method.estimator`` (recorded for every method)
    :param calibration: required when ``method.needs_calibration``; reuse one across targets and methods (it memoizes the
        greedy rows per sites/step/bounds)
    """
    if method.needs_calibration and calibration is None:
        raise ExportError(f"allocation {method.allocation} with mode {method.mode} needs calibration text")
    rows = None
    if method.allocation == "teal-greedy":
        rows = calibration.greedy_rows(method.sites, method.greedy_step, target, method.s_min, method.s_max)
    calibrated = None
    if method.allocation == "calibrated":
        calibrated = _calibrated(source, target, method, alphas, calibration)
    modules = allocate(source.projections, alphas, target, method.allocation, method.epsilon, method.sparser,
                       method.s_min, method.s_max, method.sites, rows, calibrated)
    thresholds = calibration.thresholds(modules) if method.mode == "threshold" else None
    info = None
    if method.needs_calibration:
        info = dict(calibration.info)
        if rows is not None:
            info.update(greedy_step=method.greedy_step, greedy_windows=calibration.greedy_windows)
        if calibrated is not None:
            info.update(curves="of dropping each token's smallest inputs, as TopK does",
                        curve_windows=calibration.curve_windows, acttail_prior=method.prior)
    block = sparsity_block(modules, target, method.allocation, method.estimator, method.epsilon, method.sparser,
                           method.prefill, mode=method.mode, sites=method.sites, thresholds=thresholds, calibration=info)
    return block, modules


def _calibrated(source: SourceModel, target: float, method: Method, alphas: dict[str, float],
                calibration: Calibration) -> dict[str, float]:
    """The calibrated allocation's sparsity per sparsified projection (before rounding), with ActTail's as the prior."""
    chosen = site_projections(source.projections, method.sites)
    chosen_target = site_target(source.projections, target, method.sites, method.s_max)
    prior = None
    if method.prior > 0:
        acttail = allocate(source.projections, alphas, target, "acttail", method.epsilon, method.sparser, method.s_min,
                           method.s_max, method.sites)
        prior = {name: m.sparsity for name, m in acttail.items()}
    return calibrated_sparsity(chosen, calibration.curves(), chosen_target, method.s_min, method.s_max,
                               prior, method.prior)
