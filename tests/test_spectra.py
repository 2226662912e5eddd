import subprocess
import sys

import numpy as np
import pytest
import torch

from acttail_export import spectra
from acttail_export.spectra import ESTIMATORS, alphas_from_spectra, compute_spectra, esd, hill_alpha, spectra_cache_file


def pareto_sample(exponent: float, n: int, seed: int) -> np.ndarray:
    """n samples of density p(x) ~ x^-exponent for x >= 1."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.pareto(exponent - 1.0, n) + 1.0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("exponent", [1.5, 2.0, 3.0, 4.5])
def test_hill_recovers_known_power_law_exponent(estimator, exponent):
    estimates = [hill_alpha(pareto_sample(exponent, 4000, seed), estimator) for seed in range(3)]
    assert np.mean(estimates) == pytest.approx(exponent, rel=0.12)


def test_mid_is_the_hill_formula_at_the_median():
    eigs = np.array([1.0, 2.0, 3.0, 5.0, 8.0, 13.0])
    tail = eigs[3:]
    assert hill_alpha(eigs, "mid") == pytest.approx(1 + tail.size / np.log(tail / tail[0]).sum())


def test_heavier_tail_gives_smaller_alpha():
    heavy, light = pareto_sample(1.8, 3000, 1), pareto_sample(4.0, 3000, 1)
    for estimator in ESTIMATORS:
        assert hill_alpha(heavy, estimator) < hill_alpha(light, estimator)


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (96, 96)])
def test_esd_is_squared_singular_values(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    expected = np.sort(torch.linalg.svdvals(w).numpy() ** 2)
    got = esd(w.to(torch.bfloat16).float())
    expected_bf16 = np.sort(torch.linalg.svdvals(w.to(torch.bfloat16).double()).numpy() ** 2)
    assert got.shape == (min(shape),)
    np.testing.assert_allclose(got, expected_bf16, rtol=1e-3, atol=1e-3 * expected.max())


@pytest.mark.parametrize("shape", [(64, 160), (160, 64), (50, 50)])
def test_esd_sums_the_gram_over_slices(shape, monkeypatch):
    """Slices of 16 rows (a ragged last one): the same spectrum as the Gram in one product, and a NaN in any slice is
    refused."""
    monkeypatch.setattr(spectra, "GRAM_SLICE", 16)
    w = torch.randn(*shape, dtype=torch.float64)
    expected = np.sort(torch.linalg.svdvals(w).numpy() ** 2)
    np.testing.assert_allclose(esd(w), expected, rtol=1e-9, atol=1e-9 * expected.max())
    w[-1, -1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        esd(w)


ESD_MEMORY = """
import resource, torch
from acttail_export.spectra import esd
weight = torch.empty(8192, 2048, dtype=torch.bfloat16).normal_()  # 32 MB; a float32 copy would be 64 MB
esd(torch.randn(64, 32))  # LAPACK and the allocator warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
esd(weight, dtype=torch.float32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_esd_never_converts_the_whole_weight():
    """Peak memory added by one spectrum of a 32 MB bfloat16 weight (a fresh process): the 2048 x 2048 Gram, one
    converted slice, eigvalsh's and BLAS's buffers came to 100 MB; converting the whole weight first (its float32 copy
    and NaN mask, 80 MB more) to 176 MB."""
    result = subprocess.run([sys.executable, "-P", "-c", ESD_MEMORY], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout) < 140


def test_esd_drops_zero_eigenvalues():
    w = torch.zeros(32, 48)
    w[:5] = torch.randn(5, 48)
    assert esd(w).shape == (5,)


def test_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="unknown estimator 'hill'"):
        hill_alpha(np.arange(1.0, 10.0), "hill")


def test_smollm2_alphas_are_finite_and_heavy_tailed(smollm2):
    # float64, through the spectra cache that --epsilon auto, peak exports and the tuning tests share
    spectra = compute_spectra(smollm2, dtype=torch.float64, cache_file=spectra_cache_file(smollm2, torch.float64),
                              progress=False)
    assert len(spectra) == 210
    for estimator in ESTIMATORS:
        alphas = np.array(list(alphas_from_spectra(spectra, estimator).values()))
        assert np.isfinite(alphas).all()
        # Trained weights have heavy-tailed ESDs: alpha well below the ~4+ of random matrices in these windows.
        assert 1.0 < np.median(alphas) < 6.0
