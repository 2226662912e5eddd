"""The shipped TopK reference op against a float64 brute-force reference, on fresh random inputs."""

import pytest
import torch

from acttail_export.kernels.topk import topk_mask, topk_order, topk_sparsify


def brute_force(x: torch.Tensor, k: int) -> torch.Tensor:
    """float64 reference: per row, order indices by (-|x|, index) and keep the first k."""
    x64 = x.double()
    out = torch.zeros_like(x64)
    for row_in, row_out in zip(x64.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])):
        order = sorted(range(row_in.numel()), key=lambda i: (-abs(row_in[i].item()), i))[:k]
        row_out[order] = row_in[order]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("shape", "sparsity"), [((3, 576), 0.5), ((2, 5, 1536), 0.7), ((4, 97), 0.9), ((1, 64), 0.0)])
def test_topk_matches_float64_reference(dtype, shape, sparsity):
    torch.manual_seed(hash((shape, sparsity)) % 1000)
    x = torch.randn(shape).to(dtype)
    k = max(round((1 - sparsity) * shape[-1]), 1)
    got = topk_sparsify(x, k)
    assert torch.equal(got.double(), brute_force(x, k))
    assert (topk_mask(x, k).sum(-1) == k).all()


@pytest.mark.parametrize("k", [1, 2, 63, 64])
def test_k_edge_cases(k):
    x = torch.randn(7, 64)
    assert (topk_mask(x, k).sum(-1) == k).all()
    assert torch.equal(topk_sparsify(x, k).double(), brute_force(x, k))
    if k == 64:
        assert topk_sparsify(x, k) is x


def test_float64_threshold_is_not_rounded():
    x = torch.tensor([[1 + 1e-10, 1 + 2e-10, 1 + 3e-10, 0.5]], dtype=torch.float64)
    assert topk_mask(x, 1).tolist() == [[False, False, True, False]]


def test_ties_keep_exactly_k_lowest_index_first():
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 0.0]])
    assert topk_mask(x, 2).tolist() == [[False, True, True, False, False, False, False, False]]
    assert topk_mask(x, 5).tolist() == [[True, True, True, False, True, True, False, False]]
    zeros = torch.zeros(2, 16)
    assert (topk_mask(zeros, 5).sum(-1) == 5).all()


def test_nan_input_gives_nan_output():
    x = torch.randn(2, 32)
    x[0, 3] = float("nan")
    out = topk_sparsify(x, 4)
    assert torch.isnan(out[0, 3])
    assert not torch.isnan(out[1]).any()
    assert (topk_mask(x, 4).sum(-1) == 4).all()


def test_nan_ranks_above_inf_and_the_count_stays_exact():
    x = torch.tensor([[float("inf"), 1.0, -float("nan"), -float("inf")]])
    assert topk_mask(x, 1).tolist() == [[False, False, True, False]]
    assert topk_mask(x, 2).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_order_prefixes_are_the_topk_masks(dtype):
    x = torch.randn(3, 200).to(dtype)
    x[0, :40] = 0.25  # ties
    order = topk_order(x)
    for k in (1, 7, 40, 100, 200):
        assert torch.equal(torch.zeros_like(x, dtype=torch.bool).scatter_(-1, order[:, :k], True), topk_mask(x, k))
