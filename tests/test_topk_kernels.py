"""Decode kernels (Triton, and the CPU gather path) against the torch reference and a float64 GEMV, on fresh random inputs.

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small.
Every output and scratch buffer is poisoned (``poisoned_empty``) before each run.
"""

import pytest
import torch

from acttail_export.kernels.topk import topk_mask, topk_order
from acttail_export.kernels.topk_cpu import sparse_linear_cpu
from acttail_export.kernels.topk_triton import sparse_gemv, topk_select
from conftest import DEVICE, assert_gemv_close



def random_input(rows: int, d: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g).to(dtype).to(DEVICE)


def masks_from(idx: torch.Tensor, d: int) -> torch.Tensor:
    return torch.zeros(idx.shape[0], d, dtype=torch.bool, device=idx.device).scatter_(1, idx.long(), True)


SELECT_CASES = [  # rows, d, ks
    (1, 576, [288, 173, 576]),
    (3, 1536, [768]),
    (2, 97, [1, 50]),
    (4, 64, [64, 1, 32]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "d", "ks"), SELECT_CASES)
def test_select_matches_reference(rows, d, ks, dtype, poisoned_empty):
    x = random_input(rows, d, dtype, seed=d + len(ks))
    idx = topk_select(x, ks)
    start = 0
    for k in ks:
        mine = idx[:, start:start + k]
        assert (mine[:, 1:] > mine[:, :-1]).all(), "indices ascending"
        assert torch.equal(masks_from(mine, d), topk_mask(x, k))
        start += k


def test_select_breaks_ties_by_index_and_ranks_nan_first(poisoned_empty):
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 0.0],
                      [0.0] * 8,
                      [1.0, float("nan"), float("inf"), -3.0, 0.0, 0.0, 0.0, 0.0]], device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16):
        idx = topk_select(x.to(dtype), [2, 5, 1]).cpu()
        assert idx[0].tolist() == [1, 2] + [0, 1, 2, 4, 5] + [1]
        assert idx[1].tolist() == [0, 1] + [0, 1, 2, 3, 4] + [0]
        assert idx[2].tolist() == [1, 2] + [0, 1, 2, 3, 4] + [1]


GEMV_CASES = [  # rows, d_in, d_out, sparsity
    (1, 576, 1536, 0.5),
    (1, 1536, 576, 0.7),
    (3, 97, 70, 0.37),
    (2, 200, 33, 0.9),
    (1, 64, 48, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "d_in", "d_out", "sparsity"), GEMV_CASES)
def test_triton_gemv_matches_float64(rows, d_in, d_out, sparsity, dtype, poisoned_empty):
    x = random_input(rows, d_in, dtype, seed=d_in)
    weight_t = random_input(d_in, d_out, dtype, seed=d_out)
    bias = random_input(1, d_out, dtype, seed=3)[0] if rows != 1 else None
    k = max(1, round((1 - sparsity) * d_in))
    y = sparse_gemv(x, topk_select(x, [k]), weight_t, bias)
    assert_gemv_close(y, x, k, weight_t, bias)


def test_triton_gemv_reads_a_column_slice_of_a_shared_selection(poisoned_empty):
    x = random_input(2, 300, torch.float32, seed=1)
    weight_t = random_input(300, 40, torch.float32, seed=2)
    ks = [150, 90, 30]
    idx = topk_select(x, ks)
    for start, k in zip([0, 150, 240], ks):
        assert_gemv_close(sparse_gemv(x, idx[:, start:start + k], weight_t, None), x, k, weight_t, None)


def test_triton_nan_input_gives_nan_output_in_its_row_only(poisoned_empty):
    x = random_input(2, 128, torch.bfloat16, seed=5)
    x[0, 17] = float("nan")
    weight_t = random_input(128, 64, torch.bfloat16, seed=6)
    y = sparse_gemv(x, topk_select(x, [10]), weight_t, None)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("rows", "d_in", "d_out", "sparsity"), GEMV_CASES + [(2, 4096, 512, 0.8)])
def test_cpu_gather_matches_float64(rows, d_in, d_out, sparsity, dtype, poisoned_empty):
    x = random_input(rows, d_in, dtype, seed=d_in).cpu()
    weight_t = random_input(d_in, d_out, dtype, seed=d_out).cpu()
    bias = random_input(1, d_out, dtype, seed=3)[0].cpu() if rows != 1 else None
    k = max(1, round((1 - sparsity) * d_in))
    y = sparse_linear_cpu(x, topk_order(x)[:, :k], weight_t, bias)
    assert_gemv_close(y, x, k, weight_t, bias)


def test_cpu_gather_nan_input_gives_nan_output():
    x = torch.randn(2, 256)
    x[1, 3] = float("nan")
    y = sparse_linear_cpu(x, topk_order(x)[:, :100], torch.randn(256, 32), None)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any()
