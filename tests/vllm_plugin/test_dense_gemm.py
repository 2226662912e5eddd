"""The masked steps of the plugin's linear method (prefill, and batches past the sparse GEMV's break-even), in process:
vLLM's own dense GEMM on the plugin's packed copy of each member, and ``masked_gemm_cpu`` on the input-major weights
when that copy is turned off, both equal to a float64 mask + matmul on fresh random inputs; in bfloat16 the masked and
the sparse path."""

import gc

import pytest
import torch

from acttail_export.kernels.topk import topk_mask
from acttail_export.kernels.topk_cpu import NATIVE_HALF_GEMM
from acttail_export.modeling.modeling_acttail import max_sparse_rows
from acttail_export.vllm_sparse import _LAYERS, SparseLinearMethod, _sparse_linear

CASES = [  # d_in, widths (members of one fused layer), TopK counts, bias
    (576, [576, 192, 192], [300, 200, 576], True),
    (576, [1536, 1536], [173, 288], False),
    (1536, [576], [461], True),
    (97, [33, 66], [1, 50], False),
]


class _Layer(torch.nn.Module):
    """The attributes of a vLLM linear layer that the method reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, widths: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.clone(), requires_grad=False)
        self.output_partition_sizes = widths


def _prepared(method: SparseLinearMethod, layer: _Layer, max_rows: int) -> list | None:
    """``process_weights_after_loading``, then the layer's rows for the sparse GEMV set to ``max_rows``; returns the
    layer's dense GEMMs (None: masked_gemm_cpu)."""
    method.process_weights_after_loading(layer)
    key = layer.acttail_weight_t.data_ptr()
    _LAYERS[key] = (max_rows, _LAYERS[key][1])
    return _LAYERS[key][1]


@pytest.mark.parametrize("dense_gemm", ["1", "0"])
@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize(("d_in", "widths", "ks", "with_bias"), CASES)
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_masked_steps_equal_a_float64_reference(monkeypatch, dense_gemm, mode, d_in, widths, ks, with_bias, rows):
    monkeypatch.setenv("ACTTAIL_VLLM_DENSE_GEMM", dense_gemm)
    generator = torch.Generator().manual_seed(rows * 1000 + d_in)
    weight = torch.randn(sum(widths), d_in, generator=generator)
    bias = torch.randn(sum(widths), generator=generator) if with_bias else None
    x = torch.randn(rows, d_in, generator=generator)
    thresholds = [0.3, 0.8, 1.5][:len(widths)] if mode == "threshold" else []
    method = SparseLinearMethod([] if thresholds else ks, thresholds, 1.0, False, "cpu")
    layer = _Layer(weight, bias, widths)
    gemms = _prepared(method, layer, 0)  # every step masked
    assert (gemms is not None) == (dense_gemm == "1")
    y = _sparse_linear(x, None, layer.acttail_weight_t, layer.bias, widths, method.ks, method.thresholds, 0)
    masks = [x.abs() > t for t in thresholds] if thresholds else [topk_mask(x, k) for k in ks]
    want = torch.cat([torch.where(mask, x, 0).double() @ part.double().t()
                      for mask, part in zip(masks, weight.split(widths))], dim=-1)
    if bias is not None:
        want += bias.double()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_rows", [0, 64])  # every step masked (float32 blocks here), or the sparse GEMV
@pytest.mark.parametrize(("d_in", "widths", "ks", "with_bias"), CASES)
@pytest.mark.parametrize("rows", [1, 8, 40])
def test_bfloat16_steps_equal_a_float64_reference(monkeypatch, max_rows, d_in, widths, ks, with_bias, rows):
    """vLLM's CPU default dtype: both paths within one bfloat16 rounding of the sum (and one of the bias); the masked
    path as float32 blocks, as on a CPU without a native bfloat16 GEMM."""
    monkeypatch.setenv("ACTTAIL_VLLM_DENSE_GEMM", "0")
    monkeypatch.setitem(NATIVE_HALF_GEMM, torch.bfloat16, False)
    generator = torch.Generator().manual_seed(rows * 1000 + d_in + max_rows)
    weight = torch.randn(sum(widths), d_in, generator=generator).bfloat16()
    bias = torch.randn(sum(widths), generator=generator).bfloat16() if with_bias else None
    x = torch.randn(rows, d_in, generator=generator).bfloat16()
    method = SparseLinearMethod(ks, [], 1.0, False, "cpu")
    layer = _Layer(weight, bias, widths)
    _prepared(method, layer, max_rows)
    y = _sparse_linear(x, None, layer.acttail_weight_t, layer.bias, widths, method.ks, [], 0)
    xs = [torch.where(topk_mask(x, k), x, 0).double() for k in ks]
    unbiased = torch.cat([m @ part.double().t() for m, part in zip(xs, weight.split(widths))], dim=-1)
    scale = torch.cat([m.abs() @ part.double().abs().t() for m, part in zip(xs, weight.split(widths))], dim=-1)
    want = unbiased + (bias.double() if bias is not None else 0)
    assert y.dtype == torch.bfloat16
    assert ((y.double() - want).abs() <= 2**-7 * (want.abs() + unbiased.abs()) + 1e-5 * scale).all()


def test_the_dense_copies_go_with_their_layer(monkeypatch):
    monkeypatch.setenv("ACTTAIL_VLLM_DENSE_GEMM", "1")
    method = SparseLinearMethod([3], [], 0.5, False, "cpu")
    layer = _Layer(torch.randn(16, 8), None, [16])
    method.process_weights_after_loading(layer)
    key = layer.acttail_weight_t.data_ptr()
    assert _LAYERS[key][1] is not None
    del layer
    gc.collect()
    assert key not in _LAYERS


@pytest.mark.parametrize("backend, env", [("cpu", {}), ("reference", {}), ("cpu", {"ACTTAIL_VLLM_DENSE_GEMM": "1"})])
def test_a_layers_path_is_read_when_it_runs(monkeypatch, backend, env):
    """What decides a step's path (the rows the sparse GEMV serves, vLLM's dense GEMMs) is found from the weight the
    custom op receives, at run time: a graph that torch.compile cached with other settings cannot carry stale ones."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    method = SparseLinearMethod([3], [], 0.5, False, backend)
    layer = _Layer(torch.randn(16, 8), None, [16])
    method.process_weights_after_loading(layer)
    max_rows, gemms = _LAYERS[layer.acttail_weight_t.data_ptr()]
    assert max_rows == (0 if backend == "reference" else max_sparse_rows("cpu", 0.5, 16 * 8 * 4, torch.float32))
    assert max_rows != 0 or backend == "reference"
    assert (gemms is not None) == bool(env)
    # a weight no layer registered takes the masked path, exact all the same
    x, weight_t = torch.randn(2, 8), layer.acttail_weight_t.clone()
    torch.testing.assert_close(_sparse_linear(x, None, weight_t, None, [16], [3], [], 0),
                               torch.where(topk_mask(x, 3), x, 0) @ weight_t)
