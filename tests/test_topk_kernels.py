"""Decode kernels (Triton, and the CPU gather path) against the torch reference and a float64 GEMV, on fresh random inputs.

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so shapes stay small;
``benchmarks/gpu_check.py`` runs the same checks at 7B / 8B shapes on a GPU. Every output and scratch buffer is
poisoned (``poisoned_empty``) before each run.
"""

import pytest
import torch

from acttail_export.kernels.topk import threshold_sparsify, topk_mask, topk_order
from acttail_export.kernels import topk_triton
from acttail_export.kernels.topk_triton import gemv_blocks, sparse_gemv, threshold_cut, topk_cut
from conftest import DEVICE, EPS, assert_gemv_close


def random_input(rows: int, d: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d, generator=g).to(dtype).to(DEVICE)


def tied_input(rows: int, d: int, dtype, seed: int) -> torch.Tensor:
    """Small integers with random signs, +-0 among them: many equal magnitudes, so kept sets hinge on the tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (rows, d), generator=g).to(dtype).to(DEVICE)


def kept_by_cut(x: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """[B, M, d] kept masks described by cuts [B or 1, M, 2] (the kernels' rule, applied in torch)."""
    from acttail_export.kernels.topk import magnitude_keys

    keys = magnitude_keys(x).int()[:, None, :]
    index = torch.arange(x.shape[1], device=x.device)
    kth, cutoff = cut[..., 0:1], cut[..., 1:2]
    return (keys > kth) | ((keys == kth) & (index <= cutoff))


SELECT_CASES = [  # rows, d, ks
    (1, 576, [288, 173, 576]),
    (3, 1536, [768]),
    (2, 97, [1, 50]),
    (4, 64, [64, 1, 32]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "d", "ks"), SELECT_CASES)
@pytest.mark.parametrize("make", [random_input, tied_input])
def test_topk_cut_keeps_the_reference_set(rows, d, ks, dtype, make, poisoned_empty):
    x = make(rows, d, dtype, seed=d + len(ks))
    kept = kept_by_cut(x, topk_cut(x, ks))
    for m, k in enumerate(ks):
        assert torch.equal(kept[:, m], topk_mask(x, k)), f"member {m}, k={k}"


def test_topk_cut_breaks_ties_by_index_and_ranks_nan_and_inf_first(poisoned_empty):
    x = torch.tensor([[1.0, -2.0, 2.0, 0.5, -2.0, 2.0, 0.0, -0.0],
                      [0.0, -0.0, 0.0, -0.0, 0.0, 0.0, 0.0, 0.0],
                      [1.0, float("nan"), float("-inf"), -3.0, 0.0, 0.0, float("inf"), 0.0]], device=DEVICE)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        kept = kept_by_cut(x.to(dtype), topk_cut(x.to(dtype), [2, 5, 1])).cpu()
        rows = [[kept[r, m].nonzero().flatten().tolist() for m in range(3)] for r in range(3)]
        assert rows[0] == [[1, 2], [0, 1, 2, 4, 5], [1]]
        assert rows[1] == [[0, 1], [0, 1, 2, 3, 4], [0]]
        assert rows[2] == [[1, 2], [0, 1, 2, 3, 6], [1]]  # NaN, then the two infs (lower index first), 3, 1


@pytest.fixture(params=["masked", "compacted", "compacted in chunks of 128"])
def tiles(request, monkeypatch):
    """The GEMV with masked tiles, then compacted ones (a GPU's autotuner picks either), listing the kept rows in
    one chunk or in chunks of 128 (a count carried across chunks)."""
    for tuner in topk_triton._sparse_gemv_tuned.values():
        monkeypatch.setattr(tuner, "configs", [topk_triton.tile_config(32, 4, request.param != "masked")])
    if request.param.endswith("128"):
        monkeypatch.setattr(topk_triton, "LIST_CHUNK", 128)
    return request.param


GEMV_CASES = [  # rows, d_in, member widths, sparsity of each member
    (1, 576, [1536], [0.5]),
    (1, 1536, [576], [0.7]),
    (1, 576, [576, 192, 192], [0.6, 0.3, 0.0]),  # q/k/v of SmolLM2, v dense
    (3, 97, [64, 32], [0.37, 0.9]),
    (2, 200, [48], [0.9]),
    (1, 64, [48], [0.0]),
]


def reference_outputs(x, weight_t, bias, widths, masks):
    """float64 ``x_kept @ weight_t + bias`` per member, and the scale sum|x_i w_i| for the error bound."""
    ys, scales, start = [], [], 0
    for width, mask in zip(widths, masks):
        xs = torch.where(mask, x, 0).double()
        w = weight_t[:, start:start + width].double()
        ys.append(xs @ w + (bias[start:start + width].double() if bias is not None else 0))
        scales.append(xs.abs() @ w.abs())
        start += width
    return torch.cat(ys, 1), torch.cat(scales, 1)


def assert_close_to(y, ref, scale, dtype):
    assert y.dtype == dtype and y.shape == ref.shape and not torch.isnan(y).any()
    assert ((y.double() - ref).abs() <= EPS[dtype] * ref.abs() + 1e-5 * scale + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "d_in", "widths", "sparsities"), GEMV_CASES)
def test_topk_gemv_matches_float64(rows, d_in, widths, sparsities, dtype, tiles, poisoned_empty):
    x = random_input(rows, d_in, dtype, seed=d_in)
    weight_t = random_input(d_in, sum(widths), dtype, seed=sum(widths))
    bias = random_input(1, sum(widths), dtype, seed=3)[0] if rows != 1 else None
    ks = [max(1, round((1 - s) * d_in)) for s in sparsities]
    ref, scale = reference_outputs(x, weight_t, bias, widths, [topk_mask(x, k) for k in ks])
    fused = sparse_gemv(x, weight_t, bias, widths, ks, None, max(ks) / d_in)  # the cut found inside the GEMV programs
    assert_close_to(fused, ref, scale, dtype)
    given = sparse_gemv(x, weight_t, bias, widths, [], topk_cut(x, ks), max(ks) / d_in)  # the separate kernel's cut
    assert_close_to(given, ref, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("rows", "d_in", "widths", "sparsities"), GEMV_CASES[2:4])
def test_threshold_gemv_matches_float64(rows, d_in, widths, sparsities, dtype, tiles, poisoned_empty):
    x = random_input(rows, d_in, dtype, seed=d_in + 1)
    x[0, :5] = torch.tensor([0.5, -0.5, float("nan"), 0.0, -0.0], dtype=dtype)  # at the threshold, NaN, +-0
    weight_t = random_input(d_in, sum(widths), dtype, seed=7)
    thresholds = [float(torch.quantile(x.float().abs().nan_to_num(), s)) if s else 0.5 for s in sparsities]
    masks = [threshold_sparsify(x, t) != 0 for t in thresholds]
    masks = [m | torch.isnan(x) for m in masks]
    ref, scale = reference_outputs(x.nan_to_num(), weight_t, None, widths, masks)
    y = sparse_gemv(x, weight_t, None, widths, [], threshold_cut(thresholds, dtype, DEVICE), 1 - min(sparsities))
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any(), "a kept NaN reaches every output of its row only"
    assert_close_to(y[1:], ref[1:], scale[1:], dtype)
    cut_masks = kept_by_cut(x, threshold_cut(thresholds, dtype, DEVICE))
    for m, t in enumerate(thresholds):
        assert torch.equal(cut_masks[:, m], ~(x.abs() <= t)), "kept iff not |x| <= t, compared in x's dtype"


def test_gemv_splits_and_blocks_fit_member_boundaries():
    block_n, splits, rows_per_split = gemv_blocks((576, 192, 192), 576, 1, torch.device("cpu"))
    assert block_n == 64 and (576 % block_n, 768 % block_n) == (0, 0)
    assert splits * rows_per_split >= 576 and rows_per_split % 128 == 0
    assert gemv_blocks((4096, 1024, 1024), 4096, 1, torch.device("cpu"))[0] == 128


def test_triton_nan_input_gives_nan_output_in_its_row_only(tiles, poisoned_empty):
    x = random_input(2, 128, torch.bfloat16, seed=5)
    x[0, 17] = float("nan")
    weight_t = random_input(128, 64, torch.bfloat16, seed=6)
    y = sparse_gemv(x, weight_t, None, [64], [10], None, 10 / 128)
    assert torch.isnan(y[0]).all() and not torch.isnan(y[1]).any()


def test_two_kernel_files_in_one_process_each_register_their_own_ops(tmp_path):
    """Two checkpoints with different kernel files, loaded in one process, must each run their own kernels."""
    import importlib.util
    from pathlib import Path

    from acttail_export.kernels import topk_triton

    source = Path(topk_triton.__file__).read_text()
    copies = []
    for version in ("a", "b"):
        path = tmp_path / version / "topk_triton.py"
        path.parent.mkdir()
        path.write_text(source + f"\n# kernel file version {version}\n")
        spec = importlib.util.spec_from_file_location(f"topk_triton_{version}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        copies.append(module)
    suffixes = {module.OP_SUFFIX for module in copies}
    assert len(suffixes) == 2 and topk_triton.OP_SUFFIX not in suffixes
    for suffix in suffixes:
        assert hasattr(torch.ops.acttail, f"sparse_gemv_{suffix}")
    x, weight_t = random_input(1, 64, torch.float32, 0), random_input(64, 32, torch.float32, 1)
    outputs = [module.sparse_gemv(x, weight_t, None, [32], [16], None, 0.25) for module in copies]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("ks", [[], [0], [65], [8, 8]])
def test_gemv_refuses_counts_that_do_not_fit_its_members(ks):
    x, weight_t = random_input(1, 64, torch.float32, 0), random_input(64, 32, torch.float32, 1)
    with pytest.raises(AssertionError, match="bad ks"):
        sparse_gemv(x, weight_t, None, [32], ks, None, 0.5)
