"""CPU decode path (kernels/topk_cpu.py), numba bags and torch fallback alike, against the TopK / threshold reference
and a float64 GEMV, in float32 / float64 and bfloat16 / float16 (float32 sums, one rounding of the output): kept sets
(ties, NaN, inf, k=1, k=d, several rows, a tensor-parallel shard), outputs (buffers poisoned before each run), the
column blocks, and numba being optional."""

import os
import platform
import subprocess
import sys
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from acttail_export.kernels import topk_cpu
from acttail_export.kernels.topk import threshold_sparsify, topk_mask
from acttail_export.kernels.topk_cpu import MIN_WIDTH, GemvPlan, gemv_bags, kept_masks, sparse_gemv_cpu
from conftest import assert_gemv_close


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(params=["numba direct", "numba bags", "torch"])
def path(request, monkeypatch):
    """The GEMV's three ways: numba's direct GEMV (16-bit weights where the column blocks pair up), numba's bags +
    embedding_bag, torch ops."""
    if request.param.startswith("numba") and topk_cpu.numba is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(topk_cpu, "USE_NUMBA", request.param != "torch")
    if request.param == "numba direct":
        monkeypatch.setattr(topk_cpu, "DIRECT_MAX_BYTES", float("inf"))
    if request.param == "numba bags":
        monkeypatch.setattr(topk_cpu, "DIRECT_DTYPES", ())
    return request.param


def tied_input(rows: int, d: int, dtype, seed: int) -> torch.Tensor:
    """Small integers with random signs: many equal magnitudes, so kept sets hinge on the lower-index tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (rows, d), generator=g).to(dtype)


def make_input(rows: int, d: int, dtype, make: str, seed: int) -> torch.Tensor:
    if make == "tied":
        return tied_input(rows, d, dtype, seed)
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def poison(plan: GemvPlan) -> None:
    """Fill the plan's reused bag buffers with garbage, so a bag entry or offset the kernel forgot to write shows."""
    for (idx, values, offsets), _ in getattr(plan.local, "buffers", {}).values():
        idx.fill_(-7777)
        offsets.fill_(-7777)
        values.fill_(float("nan"))


def kept_sets(plan: GemvPlan, rows: int, idx, values, offsets, x) -> list[list[torch.Tensor]]:
    """Per row and member, the kept inputs as a boolean mask, read back from the bags; checks on the way that every
    column block of a member holds the same inputs, ascending, each with its value from x."""
    ends = offsets.tolist()[1:] + [idx.numel()]
    masks = [[None] * len(plan.widths) for _ in range(rows)]
    for b in range(rows):
        for c in range(plan.chunks):
            bag = b * plan.chunks + c
            entries = idx[offsets[bag]:ends[bag]].long()
            assert (entries % plan.chunks == c).all(), "a bag reads its own column block"
            inputs = entries // plan.chunks
            assert (inputs[1:] > inputs[:-1]).all(), "inputs ascending"
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]  # NaN == NaN as bits
            assert torch.equal(values[offsets[bag]:ends[bag]].view(bits), x[b, inputs].view(bits))
            mask = torch.zeros(x.shape[1], dtype=torch.bool).index_fill_(0, inputs, True)
            m = plan.owner[c]
            assert masks[b][m] is None or torch.equal(masks[b][m], mask), "one kept set per member and row"
            masks[b][m] = mask
    return masks


SELECT_CASES = [  # rows, d, widths, ks
    (1, 576, [576, 192, 192], [91, 92, 181]),
    (3, 1536, [576], [494]),
    (2, 97, [40, 24, 16], [1, 97, 50]),
    (4, 64, [64, 32], [64, 1]),
    (1, 1, [16], [1]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d", "widths", "ks"), SELECT_CASES)
@pytest.mark.parametrize("make", ["randn", "tied"])
def test_bags_keep_the_reference_topk(rows, d, widths, ks, dtype, make, path):
    x = make_input(rows, d, dtype, make, seed=d)
    plan = GemvPlan(widths, ks, None, dtype)
    for _ in range(2):  # the second call reuses the poisoned buffers of the first
        poison(plan)
        masks = kept_sets(plan, rows, *gemv_bags(plan, x), x)
        for m, k in enumerate(ks):
            assert torch.equal(torch.stack([masks[b][m] for b in range(rows)]), topk_mask(x, k)), f"k={k}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_bags_rank_nan_and_inf_first_and_ties_by_index(dtype, path):
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, 0.0],
                      [0.0] * 8,
                      [1.0, float("nan"), float("-inf"), -3.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    plan = GemvPlan([16, 16, 16], [2, 5, 1], None, dtype)
    masks = kept_sets(plan, 3, *gemv_bags(plan, x), x)
    got = [m.nonzero().view(-1).tolist() for row in masks for m in row]
    assert got == [[1, 2], [0, 1, 2, 4, 5], [1],
                   [0, 1], [0, 1, 2, 3, 4], [0],
                   [1, 2], [0, 1, 2, 3, 4], [1]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bags_keep_what_the_threshold_keeps(dtype, path):
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1, :5] = torch.tensor([0.5, -0.5, 0.0, -0.0, float("nan")])
    x[2] = 0.1  # nothing kept in this row by the larger threshold
    thresholds = [0.5, 0.05]
    plan = GemvPlan([64, 32], None, thresholds, dtype)
    poison(plan)
    masks = kept_sets(plan, 3, *gemv_bags(plan, x), x)
    for m, t in enumerate(thresholds):
        reference = threshold_sparsify(x, t) != 0  # NaN != 0: kept
        assert torch.equal(torch.stack([masks[b][m] for b in range(3)]), reference), f"threshold {t}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bags_of_a_shard_keep_the_whole_inputs_topk(dtype, path):
    """Tensor parallel: a row-parallel layer's shard keeps its part of the whole input's TopK, not its own."""
    x_full = make_input(3, 200, dtype, "tied", seed=5)
    plan = GemvPlan([32, 16], [37, 150], None, dtype)
    for lo in (0, 60, 150):
        poison(plan)
        shard = x_full[:, lo:lo + 50].contiguous()
        masks = kept_sets(plan, 3, *gemv_bags(plan, shard, x_full, lo), shard)
        for m, k in enumerate(plan.ks):
            assert torch.equal(torch.stack([masks[b][m] for b in range(3)]), topk_mask(x_full, k)[:, lo:lo + 50])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d", "widths", "ks"), SELECT_CASES + [(40, 576, [576, 192], [288, 100])])
def test_masks_are_the_reference_topk_and_threshold(rows, d, widths, ks, dtype, path, poisoned_empty):
    """kept_masks (the masked dense path of prompts and large batches): every member's TopK, threshold, and a shard's
    part of the whole input's TopK, each written in full (poisoned_empty: an unwritten entry shows)."""
    x = make_input(rows, d, dtype, "tied", seed=d + rows)
    masks = kept_masks(GemvPlan(widths, ks, None, dtype), x)
    assert torch.equal(masks, torch.stack([topk_mask(x, k) for k in ks]))
    thresholds = [1.5, 3.5][:len(widths)]
    masks = kept_masks(GemvPlan(widths[:2], None, thresholds, dtype), x)
    assert torch.equal(masks, torch.stack([threshold_sparsify(x, t) != 0 for t in thresholds]))
    lo = d // 3
    shard = x[:, lo:lo + d // 2].contiguous()
    masks = kept_masks(GemvPlan(widths, ks, None, dtype), shard, x, lo)
    assert torch.equal(masks, torch.stack([topk_mask(x, k)[:, lo:lo + d // 2] for k in ks]))


GEMV_CASES = [  # rows, d_in, widths, ks, bias
    (1, 576, [1536, 1536], [173, 288], False),
    (1, 576, [576, 192, 192], [300, 200, 576], True),
    (1, 1536, [576], [461], False),
    (3, 97, [70], [1], True),
    (2, 200, [33, 33, 66], [200, 20, 7], True),
    (5, 64, [48], [64], False),
    (8, 130, [19, 38], [13, 9], True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d_in", "widths", "ks", "with_bias"), GEMV_CASES)
@pytest.mark.parametrize("make", ["randn", "tied"])
@pytest.mark.parametrize("threads", [1, 4])  # the column blocks: one per member, or several (the suite runs one thread)
def test_gemv_matches_float64(rows, d_in, widths, ks, with_bias, dtype, make, threads, path):
    x = make_input(rows, d_in, dtype, make, seed=d_in + sum(widths))
    linear = torch.nn.Linear(d_in, sum(widths), bias=with_bias, dtype=dtype)  # parameters require grad, as in a model
    weight_t = linear.weight.detach().t().contiguous()
    plan = GemvPlan(widths, ks, None, dtype, threads)
    assert plan.direct == (path == "numba direct" and (dtype.itemsize > 2 or all(w % 2 == 0 for w in widths)))
    with torch.no_grad():
        for _ in range(2):
            poison(plan)
            y = sparse_gemv_cpu(x, weight_t, plan, linear.bias)
            start = 0
            for width, k in zip(widths, ks):
                bias = linear.bias[start:start + width] if with_bias else None
                assert_gemv_close(y[:, start:start + width], x, k, weight_t[:, start:start + width], bias,
                                  bias_after_rounding=True)
                start += width


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_and_shard_gemvs_match_float64(dtype, path):
    x = torch.randn(3, 300, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[2] = 0.1  # nothing kept by the threshold in this row: the bias alone
    weight_t, bias = torch.randn(300, 48, dtype=dtype), torch.randn(48, dtype=dtype)
    plan = GemvPlan([32, 16], None, [0.5, 1.0], dtype)
    poison(plan)
    y = sparse_gemv_cpu(x, weight_t, plan, bias)
    for (lo, hi), t in zip([(0, 32), (32, 48)], [0.5, 1.0]):
        assert_gemv_close(y[:, lo:hi], x, None, weight_t[:, lo:hi], bias[lo:hi], kept=threshold_sparsify(x, t) != 0,
                          bias_after_rounding=True)
    plan = GemvPlan([48], [120], None, dtype)
    poison(plan)
    y = sparse_gemv_cpu(x[:, 100:200].contiguous(), weight_t[100:200].contiguous(), plan, None, x, 100)
    assert_gemv_close(y, x[:, 100:200], None, weight_t[100:200], None, kept=topk_mask(x, 120)[:, 100:200])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_gives_nan_output_in_its_row_only(dtype, path):
    x = torch.randn(3, 256, dtype=dtype)
    x[1, 3] = float("nan")
    y = sparse_gemv_cpu(x, torch.randn(256, 32, dtype=dtype), GemvPlan([32], [100], None, dtype))
    assert torch.isnan(y[1]).all() and not torch.isnan(y[0]).any() and not torch.isnan(y[2]).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_output_is_rounded_once_as_torch_rounds(dtype, path):
    """One kept input: each output is one product, exact in float32 (8- or 11-bit mantissas), so the output must be
    its rounding to nearest bit for bit, at the overflow edge and for inf and NaN weights too: torch's (ties to even)
    for float16 and for the direct GEMV's float32 sums; for bfloat16 through embedding_bag, FBGEMM's, which rounds
    ties away from zero."""
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(1, 4096, generator=g) * torch.logspace(-6, 6, 4096)).to(dtype)
    w[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), torch.finfo(dtype).max])
    x = torch.tensor([[0.0, 1.75, -0.5]], dtype=dtype)
    weight_t = torch.cat([torch.zeros_like(w), w, torch.zeros_like(w)])  # [3, 4096], only row 1 is kept
    y = sparse_gemv_cpu(x, weight_t, GemvPlan([4096], [1], None, dtype))
    product = x[0, 1].float() * w.float()
    if dtype == torch.bfloat16 and path != "numba direct":  # ties away from zero: add half of the dropped 16 bits' range to the magnitude bits
        finite = product.isfinite()
        product = torch.where(finite, ((product.view(torch.int32) + 0x8000) & ~0xFFFF).view(torch.float32), product)
    expected = product.to(dtype)
    assert torch.equal(y[:, 3:], expected[:, 3:])  # as values (the sum starts at +0: -0 products give +0); inf at max
    assert y[0, 0] == float("inf") and y[0, 1] == float("-inf") and torch.isnan(y[0, 2])


@settings(max_examples=200, deadline=None)
@given(widths=st.lists(st.sampled_from([16, 24, 64, 96, 192, 576, 1536, 11008, 4096, 17]), min_size=1, max_size=3),
       threads=st.integers(1, 16))
def test_column_blocks_tile_every_member(widths, threads):
    plan = GemvPlan(widths, [1] * len(widths), None, torch.float32, threads)
    assert all(w % plan.width == 0 for w in widths)
    assert plan.width >= MIN_WIDTH or plan.width == __import__("math").gcd(*widths)
    assert [plan.owner.count(m) * plan.width for m in range(len(widths))] == widths
    assert plan.owner == sorted(plan.owner)


def test_gemv_with_autograd_takes_the_reference_path_and_has_gradients(path):
    x = torch.randn(2, 40)
    weight_t = torch.randn(40, 16, requires_grad=True)
    sparse_gemv_cpu(x, weight_t, GemvPlan([16], [10], None, torch.float32)).sum().backward()
    assert weight_t.grad is not None and (weight_t.grad != 0).sum() <= 2 * 10 * 16


NO_NUMBA = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "numba":
            raise ImportError("no numba here")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, **env) -> str:
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_runs_without_numba_and_the_env_var_turns_numba_off():
    out = run_python(NO_NUMBA + """
import torch
from acttail_export.kernels import topk_cpu as m
x = torch.randn(2, 50)
print(m.numba, m.USE_NUMBA, tuple(m.sparse_gemv_cpu(x, torch.randn(50, 32), m.GemvPlan([16, 16], [5, 7], None, x.dtype)).shape))
""")
    assert out.split() == ["None", "False", "(2,", "32)"]
    assert run_python("from acttail_export.kernels import topk_cpu as m; print(m.USE_NUMBA)", ACTTAIL_NUMBA="0").strip() == "False"


@pytest.mark.parametrize("target", ["host", "generic"])
def test_every_16_bit_pattern_widens_exactly_on_the_host_and_without_f16c(target, tmp_path):
    """The direct GEMV's word halves (both columns of a word, bfloat16 and float16) against torch's widening, for all
    65536 bit patterns: the same float32 bits (NaN: any NaN). Compiled for the host and for numba's generic x86 target
    (no F16C), where LLVM's half ``fpext`` would be a call numba cannot link (the process crashed)."""
    if topk_cpu.numba is None:
        pytest.skip("numba is not installed")
    target_env = {"NUMBA_CPU_NAME": "generic"} if target == "generic" else {}
    out = run_python("""
import numba, numpy as np, torch
from acttail_export.kernels import topk_cpu as m
@numba.njit
def widen(words, even, odd):
    for i in range(words.shape[0]):
        even[i], odd[i] = m._even(words[i]), m._odd(words[i])
patterns = np.arange(65536, dtype=np.uint16)
words = np.stack([patterns, patterns[::-1]], 1).copy().view(np.uint32).reshape(-1)  # low half, high half
for dtype, word in ((torch.bfloat16, np.uint32), (torch.float16, np.int32)):
    even, odd = np.empty(65536, np.float32), np.empty(65536, np.float32)
    widen(words.view(word), even, odd)
    for got, halves in ((even, patterns), (odd, patterns[::-1])):
        want = torch.from_numpy(halves.view(np.int16).copy()).view(dtype).float().numpy()
        nan = np.isnan(want)
        print(np.array_equal(np.isnan(got), nan) and np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan]))
print(m._native_half())
""", NUMBA_CACHE_DIR=str(tmp_path), **target_env)
    assert out.split()[:4] == ["True"] * 4
    if target == "generic" and platform.machine() in ("x86_64", "AMD64"):
        assert out.split()[4] == "False"  # the integer widening ran


def test_transformers_remote_code_check_does_not_require_numba():
    from transformers.dynamic_module_utils import get_imports

    assert "numba" not in get_imports(topk_cpu.__file__) and "numpy" not in get_imports(topk_cpu.__file__)


def test_torch_compile_traces_the_reference_path_without_graph_breaks(path):
    x, weight_t = torch.randn(2, 300), torch.randn(300, 64)
    plan = GemvPlan([32, 32], [90, 150], None, torch.float32)

    with torch.inference_mode():
        y = torch.compile(lambda x: sparse_gemv_cpu(x, weight_t, plan), backend="eager", fullgraph=True)(x)
    assert_gemv_close(y[:, 32:], x, 150, weight_t[:, 32:], None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "d_in", "d_out", "block_rows"), [(1, 64, 48, 7), (9, 576, 192, 64), (40, 300, 70, 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_masked_gemm_matches_float64_on_a_member_of_an_input_major_weight(rows, d_in, d_out, block_rows, dtype,
                                                                          with_bias, monkeypatch):
    """The masked path's GEMM on one member's columns of a group's weight: 16-bit weights as float32 blocks (small
    blocks here, so that several and a ragged last one run), float32 / float64 as F.linear; one rounding."""
    monkeypatch.setattr(topk_cpu, "WIDEN_BLOCK_BYTES", block_rows * 4 * d_out)
    for half in topk_cpu.NATIVE_HALF_GEMM:  # the float32 blocks, also on a CPU that has a native 16-bit GEMM
        monkeypatch.setitem(topk_cpu.NATIVE_HALF_GEMM, half, False)
    g = torch.Generator().manual_seed(rows + d_in)
    x = torch.randn(rows, d_in, generator=g).to(dtype)
    x[:, ::3] = 0  # masked inputs
    group_weight = torch.randn(d_in, d_out + 40, generator=g).to(dtype)  # the member: columns 24:24 + d_out
    member = group_weight[:, 24:24 + d_out]
    bias = torch.randn(d_out, generator=g).to(dtype) if with_bias else None
    y = topk_cpu.masked_gemm_cpu(x, member, bias)
    assert_gemv_close(y, x, None, member, bias, kept=torch.ones_like(x, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_gemm_widens_only_without_a_native_half_gemm(dtype, monkeypatch):
    x, weight_t = torch.randn(5, 64).to(dtype), torch.randn(64, 32).to(dtype)
    calls = []
    monkeypatch.setattr(topk_cpu.F, "linear", lambda *args: calls.append(args) or torch.zeros(5, 32, dtype=dtype))
    monkeypatch.setitem(topk_cpu.NATIVE_HALF_GEMM, dtype, False)
    topk_cpu.masked_gemm_cpu(x, weight_t)
    assert not calls
    monkeypatch.setitem(topk_cpu.NATIVE_HALF_GEMM, dtype, True)
    topk_cpu.masked_gemm_cpu(x, weight_t)
    assert len(calls) == 1


@pytest.mark.parametrize("with_bias", [False, True])
def test_an_empty_step_gives_an_empty_output(with_bias, path):
    weight_t, bias = torch.randn(64, 48), torch.randn(48) if with_bias else None
    y = sparse_gemv_cpu(torch.randn(0, 64), weight_t, GemvPlan([32, 16], [20, 64], None, torch.float32), bias)
    assert y.shape == (0, 48) and y.dtype == torch.float32


def test_threads_sharing_a_plan_get_their_own_results(path):
    """Two threads decoding through one plan (one model in a threaded server) each get their own outputs: the bags'
    reused buffers are per thread (embedding_bag reads them without the GIL)."""
    plan = GemvPlan([256, 256], [100, 60], None, torch.float32, threads=4)  # column blocks as on a 4-core machine
    g = torch.Generator().manual_seed(0)
    weight_t = torch.randn(512, 512, generator=g)
    xs = [torch.randn(1, 512, generator=g) for _ in range(2)]
    expected = [sparse_gemv_cpu(x, weight_t, plan).clone() for x in xs]
    wrong = [0, 0]

    def decode(t):
        for _ in range(3000):
            wrong[t] += not torch.equal(sparse_gemv_cpu(xs[t], weight_t, plan), expected[t])

    threads = [threading.Thread(target=decode, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == [0, 0]
