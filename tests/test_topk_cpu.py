"""CPU decode path (kernels/topk_cpu.py), numba kernels and torch fallback alike, against the TopK reference and a
float64 GEMV, in float32 / float64 and bfloat16 / float16 (float32 sums, one rounding of the output): kept sets (ties,
NaN, inf, k=1, k=d, several rows), outputs (poisoned before each run), and numba being optional."""

import os
import subprocess
import sys

import pytest
import torch

from acttail_export.kernels import topk_cpu
from acttail_export.kernels.topk import topk_mask
from acttail_export.kernels.topk_cpu import select_cpu, sparse_linear_cpu
from conftest import assert_gemv_close


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["numba", "torch"])
def path(request, monkeypatch):
    if request.param == "numba" and topk_cpu.numba is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(topk_cpu, "USE_NUMBA", request.param == "numba")
    return request.param


def tied_input(rows: int, d: int, dtype, seed: int) -> torch.Tensor:
    """Small integers with random signs: many equal magnitudes, so kept sets hinge on the lower-index tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (rows, d), generator=g).to(dtype)


SELECT_CASES = [  # rows, d, ks
    (1, 576, [91, 92, 181]),
    (3, 1536, [494]),
    (2, 97, [1, 97, 50]),
    (4, 64, [64, 1, 32]),
    (1, 1, [1]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d", "ks"), SELECT_CASES)
@pytest.mark.parametrize("make", ["randn", "tied"])
def test_select_keeps_the_reference_set(rows, d, ks, dtype, make, path, poisoned_empty):
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(d)).to(dtype) if make == "randn" else tied_input(rows, d, dtype, d)
    selection, starts = select_cpu(x, ks)
    for k, start in zip(ks, starts):
        mine = selection[:, start:start + k]
        kept = torch.zeros(rows, d, dtype=torch.bool).scatter_(1, mine, True)
        assert torch.equal(kept, topk_mask(x, k)), f"k={k}"
        if path == "numba":
            assert (mine[:, 1:] > mine[:, :-1]).all(), "indices ascending"


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_ranks_nan_and_inf_first_and_ties_by_index(dtype, path, poisoned_empty):
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 0.0],
                      [0.0] * 8,
                      [1.0, float("nan"), float("-inf"), -3.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    selection, starts = select_cpu(x, [2, 5, 1])
    got = [sorted(selection[r, s:s + k].tolist()) for r in range(3) for s, k in zip(starts, [2, 5, 1])]
    assert got == [[1, 2], [0, 1, 2, 4, 5], [1],
                   [0, 1], [0, 1, 2, 3, 4], [0],
                   [1, 2], [0, 1, 2, 3, 4], [1]]


GEMV_CASES = [  # rows, d_in, d_out, ks, bias
    (1, 576, 1536, [173, 288], False),
    (1, 1536, 576, [461], False),
    (3, 97, 70, [1, 36], True),
    (2, 200, 33, [200, 20, 7], True),
    (5, 64, 48, [64], False),
    (8, 130, 19, [13, 9], True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d_in", "d_out", "ks", "with_bias"), GEMV_CASES)
@pytest.mark.parametrize("make", ["randn", "tied"])
def test_gemv_matches_float64(rows, d_in, d_out, ks, with_bias, dtype, make, path, poisoned_empty):
    g = torch.Generator().manual_seed(d_in + d_out)
    x = torch.randn(rows, d_in, generator=g).to(dtype) if make == "randn" else tied_input(rows, d_in, dtype, d_in)
    linear = torch.nn.Linear(d_in, d_out, bias=with_bias, dtype=dtype)  # parameters require grad, as in a model
    weight_t = linear.weight.detach().t().contiguous()
    with torch.no_grad():
        selection, starts = select_cpu(x, ks)
        for k, start in zip(ks, starts):  # column slices of the shared selection: non-contiguous when rows > 1
            y = sparse_linear_cpu(x, selection[:, start:start + k], weight_t, linear.bias)
            assert_gemv_close(y, x, k, weight_t, linear.bias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_gives_nan_output_in_its_row_only(dtype, path):
    x = torch.randn(3, 256, dtype=dtype)
    x[1, 3] = float("nan")
    selection, _ = select_cpu(x, [100])
    y = sparse_linear_cpu(x, selection[:, :100], torch.randn(256, 32, dtype=dtype), None)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_output_is_rounded_once_as_torch_rounds(dtype, path, poisoned_empty):
    """One kept input: each output is one product, exact in float32 (8- or 11-bit mantissas), so the output must be
    torch's rounding of it bit for bit, at the overflow edge and for inf and NaN weights too."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1, 4096, generator=g) * torch.logspace(-6, 6, 4096)).to(dtype)
    w[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), torch.finfo(dtype).max])
    x = torch.tensor([[0.0, 1.75, -0.5]], dtype=dtype)
    weight_t = torch.cat([torch.zeros_like(w), w, torch.zeros_like(w)])  # [3, 4096], only row 1 is kept
    y = sparse_linear_cpu(x, torch.tensor([[1]]), weight_t, None)
    expected = (x[0, 1].float() * w.float()).to(dtype)
    assert torch.equal(y[:, 3:], expected[:, 3:])  # as values (the sum starts at +0: -0 products give +0); inf at max
    assert y[0, 0] == float("inf") and y[0, 1] == float("-inf") and torch.isnan(y[0, 2])


def test_gemv_rejects_out_of_range_indices(path):
    with pytest.raises((IndexError, RuntimeError)):
        sparse_linear_cpu(torch.randn(1, 8), torch.tensor([[0, 8]]), torch.randn(8, 4), None)


def test_gemv_with_autograd_takes_the_torch_path_and_has_gradients(path):
    x = torch.randn(2, 40)
    weight_t = torch.randn(40, 6, requires_grad=True)
    selection, _ = select_cpu(x, [10])
    sparse_linear_cpu(x, selection, weight_t, None).sum().backward()
    assert weight_t.grad is not None and (weight_t.grad != 0).sum() <= 2 * 10 * 6


NO_NUMBA = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "numba":
            raise ImportError("no numba here")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_runs_without_numba_and_the_env_var_turns_numba_off():
    out = run_python(NO_NUMBA + """
import torch
from acttail_export.kernels import topk_cpu as m
x = torch.randn(2, 50)
sel, starts = m.select_cpu(x, [5, 7])
print(m.numba, m.USE_NUMBA, tuple(m.sparse_linear_cpu(x, sel[:, :5], torch.randn(50, 3), None).shape))
""")
    assert out.split() == ["None", "False", "(2,", "3)"]
    assert run_python("from acttail_export.kernels import topk_cpu as m; print(m.USE_NUMBA)", ACTTAIL_NUMBA="0").strip() == "False"


def test_transformers_remote_code_check_does_not_require_numba():
    from transformers.dynamic_module_utils import get_imports

    assert "numba" not in get_imports(topk_cpu.__file__) and "numpy" not in get_imports(topk_cpu.__file__)


def test_torch_compile_traces_the_torch_path_without_graph_breaks(path):
    x, weight_t = torch.randn(2, 300), torch.randn(300, 40)

    def step(x):
        selection, starts = select_cpu(x, [90, 150])
        return sparse_linear_cpu(x, selection[:, starts[1]:starts[1] + 150], weight_t, None)

    with torch.inference_mode():
        y = torch.compile(step, backend="eager", fullgraph=True)(x)  # fullgraph: a graph break raises
    assert_gemv_close(y, x, 150, weight_t, None)
