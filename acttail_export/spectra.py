"""Empirical spectral densities of projection weights and their heavy-tail exponent alpha (HT-SR theory)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ExportError
from .weights import SourceModel, cache_dir, iter_projection_weights

__all__ = [
    "ESTIMATORS",
    "DEFAULT_ESTIMATOR",
    "SPECTRA_DTYPES",
    "spectra_dtype",
    "esd",
    "hill_alpha",
    "spectra_cache_file",
    "compute_spectra",
    "alphas_from_spectra",
    "estimator_alphas",
]

ESTIMATORS = ("mid", "peak", "ks")
DEFAULT_ESTIMATOR = "mid"  # chosen from docs/RESULTS.md
SPECTRA_DTYPES = ("auto", "float32", "float64")
GRAM_SLICE = 2048  # rows of the weight converted at a time for its Gram matrix (32 MB in float32 at 4096 columns)
# Eigenvalues below this fraction of the largest are rounding noise of a Gram matrix formed in that dtype.
_RELATIVE_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6}


def spectra_dtype(name: str, estimator: str) -> torch.dtype:
    """The dtype of the Gram matrix and its eigenvalues; ``auto`` is float64 for ``peak`` only.

    The one precision rule: export, ``--epsilon auto`` (each trial's estimator), analyze, compare and the sweep script all
    take an estimator's alphas from the spectra this gives (see :func:`estimator_alphas`).

    On SmolLM2-135M, float32 moves ``mid`` alphas by at most 1% and ``ks`` alphas by 1e-4 while costing a quarter of
    float64's time (a 4096 x 11008 matrix: 4.6 s vs 18 s on 2 cores), but moves 41 of 210 ``peak`` alphas by more than
    1%: ``peak`` looks at the bottom of the spectrum, where a float32 Gram is rounding noise.
    """
    if name == "auto":
        return torch.float64 if estimator == "peak" else torch.float32
    return getattr(torch, name)


def _gram(weight: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """The smaller Gram matrix of ``weight`` (W W^T or W^T W) in ``dtype``, summed over slices of GRAM_SLICE rows of the
    long side: only one slice is ever converted, never the whole matrix (a float32 copy of a 7B MLP weight is 180 MB,
    a third of an export's peak memory)."""
    tall = weight.t() if weight.shape[0] <= weight.shape[1] else weight  # [long side, short side]
    gram = torch.zeros(tall.shape[1], tall.shape[1], device=device, dtype=dtype)
    for start in range(0, tall.shape[0], GRAM_SLICE):
        part = tall[start:start + GRAM_SLICE].to(device=device, dtype=dtype)
        if not torch.isfinite(part).all():
            raise ValueError("the weight holds NaN or infinite values")
        gram.addmm_(part.t(), part)
    return gram


def esd(weight: torch.Tensor, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Eigenvalues of W^T W (the squared singular values of W), ascending, float64, zeros and numerical zeros dropped.

    Computed as the eigenvalues of the smaller Gram matrix (W W^T or W^T W, same non-zero spectrum) in ``dtype``; in
    float32 the eigenvalues below 1e-6 of the largest are rounding noise and dropped (see :func:`spectra_dtype`).

    :param weight: ``[out, in]`` weight of any float dtype
    """
    eigs = torch.linalg.eigvalsh(_gram(weight, device, dtype)).double().cpu().numpy()
    eigs = eigs[eigs > 0]
    if eigs.size == 0:
        return eigs
    return eigs[eigs >= _RELATIVE_FLOOR[dtype] * eigs[-1]]


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


def spectra_cache_file(source: SourceModel, dtype: torch.dtype) -> Path:
    """Where the spectra of ``source`` in ``dtype`` are cached: keyed by the weight files' paths, sizes and mtimes."""
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in source.weight_files]
    key = hashlib.sha256(json.dumps([files, str(dtype)]).encode()).hexdigest()[:24]
    return cache_dir() / "spectra" / f"{key}.npz"


def _read_cache(cache_file: Path, names: list[str]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(cache_file) as data:
            spectra = {name: data[name] for name in data.files}
    except (OSError, ValueError):  # unreadable or half-written by a killed process: compute again
        return None
    return spectra if sorted(spectra) == sorted(names) else None


def compute_spectra(source: SourceModel, device: str = "cpu", dtype: torch.dtype = torch.float64,
                    cache_file: Path | None = None, progress: bool = True) -> dict[str, np.ndarray]:
    """ESD of every projection of ``source``, keyed by module name; weights are read and freed one at a time.

    :param cache_file: read the spectra from this .npz if it holds every projection, else compute and write it (so a
        re-export at another sparsity, epsilon or estimator skips the eigenvalues); None: no cache
    :param progress: a progress bar with ETA, on a terminal only (tqdm's ``disable=None``), so piped stderr holds just errors
    """
    names = [p.name for p in source.projections]
    if cache_file is not None and cache_file.is_file():
        spectra = _read_cache(cache_file, names)
        if spectra is not None:
            return spectra
    spectra = {}
    bar = tqdm(total=len(names), desc="spectra", unit="proj", disable=None if progress else True)
    with bar:
        for projection, weight in iter_projection_weights(source):
            try:
                spectra[projection.name] = esd(weight, device, dtype)
            except ValueError as e:
                raise ExportError(f"{projection.name}: {e}") from e
            del weight
            bar.update()
    if cache_file is not None:
        _write_cache(cache_file, spectra)
    return spectra


def _write_cache(cache_file: Path, spectra: dict[str, np.ndarray]) -> None:
    """Write atomically (temp file + rename); a cache that cannot be written only costs the next export time."""
    tmp = cache_file.with_name(f".{cache_file.stem}-{os.getpid()}.npz")
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **spectra)
        os.replace(tmp, cache_file)
    except OSError:
        tmp.unlink(missing_ok=True)


def alphas_from_spectra(spectra: dict[str, np.ndarray], estimator: str = DEFAULT_ESTIMATOR) -> dict[str, float]:
    """Hill alpha of each spectrum; an ESD with fewer than 3 non-zero eigenvalues cannot be fitted and stops the export."""
    alphas = {name: hill_alpha(eigs, estimator) for name, eigs in spectra.items()}
    bad = [name for name, a in alphas.items() if not np.isfinite(a)]
    if bad:
        raise ExportError(f"alpha could not be fitted for {len(bad)} projections (degenerate spectrum), e.g. {bad[0]}")
    return alphas



def estimator_alphas(source: SourceModel, estimators: Sequence[str], dtype_name: str = "auto", device: str = "cpu",
                     use_cache: bool = True, log: Callable[[str], None] | None = None) -> dict[str, dict[str, float]]:
    """Hill alpha of every projection under each estimator, each from the spectra ``spectra_dtype(dtype_name,
    estimator)`` gives: the alphas an export with that estimator writes. Spectra are computed once per precision.

    :param dtype_name: ``auto``, ``float32`` or ``float64`` (see :func:`spectra_dtype`)
    :param use_cache: read and store the spectra in the cache folder (see :func:`spectra_cache_file`)
    :param log: called with the ``spectra: ...`` lines (what is computed or reused, and the time); None: silent
    """
    log = log or (lambda line: None)
    spectra: dict[torch.dtype, dict[str, np.ndarray]] = {}
    alphas = {}
    for estimator in estimators:
        dtype = spectra_dtype(dtype_name, estimator)
        if dtype not in spectra:
            cache_file = spectra_cache_file(source, dtype) if use_cache else None
            if cache_file is not None and cache_file.is_file():
                log(f"spectra: reusing {cache_file}")
            else:
                log(f"spectra: {len(source.projections)} projections on {device} "
                    f"({str(dtype).removeprefix('torch.')} Gram + eigvalsh)")
            start = time.perf_counter()
            spectra[dtype] = compute_spectra(source, device, dtype, cache_file)
            log(f"spectra: done in {time.perf_counter() - start:.1f} s")
        alphas[estimator] = alphas_from_spectra(spectra[dtype], estimator)
    return alphas
