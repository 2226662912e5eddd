"""Empirical spectral densities of projection weights and their heavy-tail exponent alpha (HT-SR theory)."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ExportError
from .weights import SourceModel, iter_projection_weights

__all__ = ["ESTIMATORS", "DEFAULT_ESTIMATOR", "esd", "hill_alpha", "compute_spectra", "alphas_from_spectra"]

ESTIMATORS = ("mid", "peak", "ks")
DEFAULT_ESTIMATOR = "mid"  # chosen from docs/RESULTS.md
_RELATIVE_FLOOR = 1e-12  # eigenvalues below this fraction of the largest are numerical zeros


def esd(weight: torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """Eigenvalues of W^T W (the squared singular values of W), ascending, float64, zeros and numerical zeros dropped.

    Computed as the eigenvalues of the smaller Gram matrix (W W^T or W^T W, same non-zero spectrum) in float64: in float32
    the Gram's small eigenvalues are rounding noise (trained matrices reach 1e-12 of the largest), which moves xmin
    rules that look at the whole spectrum (``peak``).

    :param weight: ``[out, in]`` weight of any float dtype
    """
    w = weight.to(device=device, dtype=torch.float64)
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or infinite values")
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eigs = torch.linalg.eigvalsh(gram).cpu().numpy()
    eigs = eigs[eigs > 0]
    if eigs.size == 0:
        return eigs
    return eigs[eigs >= _RELATIVE_FLOOR * eigs[-1]]


def _hill(eigs: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """alpha_i = 1 + n_i / sum_{j >= i} ln(lambda_j / lambda_i) for each xmin index i (tail of n_i = N - i eigenvalues)."""
    logs = np.log(eigs)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[i] = sum_{j >= i} ln lambda_j
    n = eigs.size - candidates
    with np.errstate(divide="ignore"):
        return 1.0 + n / (suffix[candidates] - n * logs[candidates])


def _best_ks(eigs: np.ndarray, candidates: np.ndarray, chunk: int = 256) -> float:
    """The alpha of the xmin candidate whose fitted Pareto CDF, 1 - (x / xmin)^(1 - alpha), is closest to the empirical
    CDF of its tail in Kolmogorov-Smirnov distance (vectorised over candidates, in chunks to bound memory)."""
    alphas = _hill(eigs, candidates)
    distances = np.full(candidates.size, np.inf)
    j = np.arange(eigs.size)
    for lo in range(0, candidates.size, chunk):
        i = candidates[lo:lo + chunk, None]
        alpha = alphas[lo:lo + chunk, None]
        in_tail = j[None, :] >= i
        n = eigs.size - i
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            fitted = 1.0 - (eigs[None, :] / eigs[i]) ** (1.0 - alpha)
            below, above = (j - i) / n, (j - i + 1) / n
            gap = np.maximum(np.abs(fitted - below), np.abs(fitted - above))
        distances[lo:lo + chunk] = np.where(in_tail, gap, -np.inf).max(axis=1)
    distances[~np.isfinite(alphas) | ~np.isfinite(distances)] = np.inf
    if not np.isfinite(distances).any():
        return float("nan")
    return float(alphas[int(np.argmin(distances))])


def hill_alpha(eigs: np.ndarray, estimator: str = DEFAULT_ESTIMATOR) -> float:
    """Hill estimate of the power-law exponent of the tail of an ESD, with xmin chosen by ``estimator``.

    - ``mid``: xmin = the median eigenvalue (the tail is the upper half);
    - ``peak``: xmin among the eigenvalues in [0.95, 1.5] x the peak of the log10 histogram (100 bins), the one whose
      fitted Pareto CDF is closest to the tail in Kolmogorov-Smirnov distance;
    - ``ks``: the same KS search over every eigenvalue that leaves a tail of at least 10 (Clauset et al.).

    :param eigs: ascending positive eigenvalues, as returned by :func:`esd`
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {ESTIMATORS}")
    eigs = np.sort(np.asarray(eigs, dtype=np.float64))
    if eigs.size < 3:
        return float("nan")
    if estimator == "mid":
        return float(_hill(eigs, np.array([eigs.size // 2]))[0])
    # The largest eigenvalues cannot serve as xmin: a tail needs at least 10 eigenvalues to fit.
    last = max(eigs.size - 9, 1)
    if estimator == "ks":
        return _best_ks(eigs, np.arange(last))
    counts, edges = np.histogram(np.log10(eigs), bins=100)
    peak_bin = int(np.argmax(counts))
    peak = 10 ** ((edges[peak_bin] + edges[peak_bin + 1]) / 2)
    candidates = np.flatnonzero((eigs >= 0.95 * peak) & (eigs <= 1.5 * peak))
    candidates = candidates[candidates < last]
    if candidates.size == 0:  # an ESD too narrow for the window: fall back to the nearest eigenvalue to the peak
        candidates = np.array([min(int(np.searchsorted(eigs, peak)), last - 1)])
    return _best_ks(eigs, candidates)


def compute_spectra(source: SourceModel, device: str = "cpu", progress: bool = True) -> dict[str, np.ndarray]:
    """ESD of every projection of ``source``, keyed by module name; weights are read and freed one at a time.

    The progress bar shows on a terminal only (tqdm's ``disable=None``), so piped stderr holds just errors.
    """
    spectra = {}
    bar = tqdm(total=len(source.projections), desc="spectra", unit="proj", disable=None if progress else True)
    with bar:
        for projection, weight in iter_projection_weights(source):
            try:
                spectra[projection.name] = esd(weight, device)
            except ValueError as e:
                raise ExportError(f"{projection.name}: {e}") from e
            del weight
            bar.update()
    return spectra


def alphas_from_spectra(spectra: dict[str, np.ndarray], estimator: str = DEFAULT_ESTIMATOR) -> dict[str, float]:
    """Hill alpha of each spectrum; an ESD with fewer than 3 non-zero eigenvalues cannot be fitted and stops the export."""
    alphas = {name: hill_alpha(eigs, estimator) for name, eigs in spectra.items()}
    bad = [name for name, a in alphas.items() if not np.isfinite(a)]
    if bad:
        raise ExportError(f"alpha could not be fitted for {len(bad)} projections (degenerate spectrum), e.g. {bad[0]}")
    return alphas

