"""Activation sparsity inside vLLM's own linear layers: a linear method per projection and the torch custom op it calls.

vLLM builds every projection as a parallel layer (``qkv_proj`` and ``gate_up_proj`` fused, ``o_proj`` and ``down_proj``
row-parallel) whose computation is its ``quant_method``. :func:`apply_activation_sparsity` gives each sparse layer a
:class:`SparseLinearMethod` (vLLM's unquantized method for creating and loading the weights, ours for computing), so
vLLM keeps its fusion, tensor-parallel sharding, weight loading and batching. The semantics are the transformers
runtime's (``modeling/modeling_acttail.py``): each member of a fused layer keeps its own TopK count (or threshold) on the
shared input, ranked by ``kernels/topk.py``; a row-parallel layer under tensor parallel ranks the whole input (gathered
from every rank), so tp=2 keeps what tp=1 keeps; prompt tokens follow the block's ``prefill`` policy, decode tokens are
always sparse.

A step either runs the CPU sparse GEMV over kept weight rows (``kernels/topk_cpu.py``: few rows, a dtype it supports),
or the mask + dense GEMM of each member (every member's mask from ``kept_masks``: one compiled selection on CPU, torch
ops elsewhere), on the input-major weights (``masked_gemm_cpu``: ``F.linear``, or float32 blocks for a 16-bit weight
where torch has no native 16-bit GEMM). With ``ACTTAIL_VLLM_DENSE_GEMM=1`` on CPU that dense GEMM is
vLLM's own instead (``dispatch_cpu_unquantized_gemm``: oneDNN on a prepacked copy of each member's weight), which on a
few rows runs up to 3x faster here than torch's matmul on our layout; the price is a second copy of every sparse
weight, which vLLM counts against ``gpu_memory_utilization``. Both paths run in one function: under torch.compile as a
custom op (``torch.ops.acttail.sparse_linear``), opaque, so vLLM's compiled graph stays whole; in eager steps called
directly.
"""

import functools
import os
import weakref

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.platforms import current_platform

from .kernels.topk_cpu import DTYPES as CPU_DTYPES
from .kernels.topk_cpu import GemvPlan, kept_masks, masked_gemm_cpu, sparse_gemv_cpu
from .modeling.activation_sparsity import ActivationSparsity, sparse_prompt_tokens
# as the transformers runtime: how many rows a step may have for the CPU sparse GEMV
from .modeling.modeling_acttail import max_sparse_rows
from .modeling.projections import parse_projection

__all__ = ["SparseLinearMethod", "apply_activation_sparsity", "projection_shapes", "mark_step"]

# vLLM's fused layers -> the Hugging Face projections they hold, in output order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class _Step:
    """The token rows of the current step that the ``prefill`` policy leaves dense (bool ``[tokens]``), or None (all
    sparse). Set by the model's forward, outside the compiled graph, and read inside the custom op at run time."""

    dense_rows: torch.Tensor | None = None


def mark_step(prefill, positions: torch.Tensor) -> None:
    """Mark which tokens of this step are prompt tokens the ``prefill`` policy leaves dense.

    vLLM flattens the step's requests into one ``[tokens]`` batch; its attention metadata says where each request's
    tokens start (``query_start_loc``) and how long its sequence is after the step (``seq_lens``). A request with more
    than one token this step is a prompt (as in the transformers runtime, where a multi-token call is the prompt and a
    one-token call a decode step); "dense" leaves its tokens dense, a fraction f sparsifies the last ceil(f * S) of its
    S tokens. Exact when a prompt runs in one step: the plugin turns prefix caching off for these policies.

    :param prefill: the block's ``prefill``: "sparse", "dense" or a fraction
    :param positions: ``[tokens]`` position of each token in its sequence
    """
    _Step.dense_rows = None
    if prefill == "sparse":
        return
    metadata = get_forward_context().attn_metadata if is_forward_context_available() else None
    if isinstance(metadata, dict):
        metadata = next(iter(metadata.values()), None)
    if isinstance(metadata, list):  # one dict per micro-batch (DBO); not on CPU
        metadata = metadata[0] if metadata else None
    if metadata is None:  # a dummy (profiling or warm-up) run
        return
    starts = metadata.query_start_loc.tolist()
    seq_lens = metadata.seq_lens.tolist()
    dense = torch.zeros(positions.shape[0], dtype=torch.bool)
    for start, end, total in zip(starts, starts[1:], seq_lens):
        if end - start > 1:
            first_sparse = total if prefill == "dense" else total - sparse_prompt_tokens(prefill, total)
            dense[start:end] = positions[start:end].cpu() < first_sparse
    _Step.dense_rows = dense.to(positions.device)


# Per sparse layer, keyed by its input-major weight's data pointer (a tensor the custom op receives at run time):
# (the most rows its sparse GEMV serves, vLLM's dense GEMM of each member for the masked steps or None). Looked up at
# run time, not passed as constants: torch.compile would bake constants into the graph that vLLM caches on disk across
# restarts, whose key does not cover ACTTAIL_SPARSE_BACKEND or ACTTAIL_VLLM_DENSE_GEMM.
_LAYERS: dict[int, tuple[int, list[nn.Module] | None]] = {}


class _MemberGemm(nn.Module):
    """One member's ``[d_out, d_in]`` weight (and bias), handed to vLLM's CPU GEMM dispatch, which packs its own copy,
    sets ``cpu_linear`` and may change the bias's dtype to what its kernel takes."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x W^T + bias`` by vLLM's kernel; ``bias`` is the one vLLM hands the layer this step (a row-parallel
        layer adds it on one rank only)."""
        if bias is not None and self.bias is not None:
            bias = bias.to(self.bias.dtype)
        return self.cpu_linear(x, self.weight, bias)


def _sparse_linear(x: torch.Tensor, x_full: torch.Tensor | None, weight_t: torch.Tensor, bias: torch.Tensor | None,
                  widths: list[int], ks: list[int], thresholds: list[float], offset: int) -> torch.Tensor:
    """The outputs of a (fused) sparse layer, members side by side: ``[tokens, sum(d_out)]``.

    :param x: ``[tokens, d_in]`` the layer's input (a row-parallel layer's shard of it)
    :param x_full: the whole input, gathered from every rank, when ``x`` is a shard and the selection is TopK; else None
    :param weight_t: the members' weights side by side, input-major ``[d_in, sum(d_out)]``
    :param bias: ``[sum(d_out)]`` or None
    :param widths: each member's d_out
    :param ks: TopK mode: each member's count (of the whole input); empty in threshold mode
    :param thresholds: threshold mode: each member's threshold; empty in TopK mode
    :param offset: where ``x`` starts in ``x_full``

    The layer's entry in ``_LAYERS`` says how many rows may take the sparse GEMV, and whether the masked steps run
    vLLM's dense GEMMs (else ``masked_gemm_cpu`` on ``weight_t``); a layer without one always takes the masked path.
    """
    dense_rows = _Step.dense_rows
    if dense_rows is not None and (dense_rows.shape[0] < x.shape[0] or not dense_rows[:x.shape[0]].any()):
        dense_rows = None  # no dense prompt token in this step (or not this step's marks: a dummy run)
    max_rows, gemms = _LAYERS.get(weight_t.data_ptr(), (0, None))
    plan = _plan(tuple(widths), tuple(ks), tuple(thresholds), x.dtype)
    x, x_full = x.contiguous(), None if x_full is None else x_full.contiguous()
    if (dense_rows is None and x.shape[0] <= max_rows and x.is_cpu and x.dtype == weight_t.dtype
            and x.dtype in CPU_DTYPES):
        return sparse_gemv_cpu(x, weight_t, plan, bias, x_full, offset)
    masks = kept_masks(plan, x, x_full, offset)  # every member's (on CPU in one compiled call)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    outputs = []
    biases = bias.split(widths) if bias is not None else [None] * len(widths)
    for m, (mask, part, member_bias) in enumerate(zip(masks, weight_t.split(widths, dim=1), biases)):
        xs = torch.where(mask, x, zero)
        if dense_rows is not None:
            xs = torch.where(dense_rows[:x.shape[0], None], x, xs)
        if gemms is None:
            outputs.append(masked_gemm_cpu(xs, part, member_bias))
        else:
            outputs.append(gemms[m](xs, member_bias))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


# The op is what torch.compile sees (opaque, so vLLM's compiled graph stays whole). Defined on a torch.library
# fragment, not by torch.library.custom_op, whose wrapper cost ~35 us a call on this CPU against ~18 us (120 calls a
# SmolLM2 step: 2 ms of a compiled step). An eager step calls the function itself, without any dispatch.
_LIBRARY = torch.library.Library("acttail", "FRAGMENT")
_LIBRARY.define("sparse_linear(Tensor x, Tensor? x_full, Tensor weight_t, Tensor? bias, int[] widths, int[] ks, "
                "float[] thresholds, int offset) -> Tensor")
_LIBRARY.impl("sparse_linear", _sparse_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("acttail::sparse_linear", lib=_LIBRARY)
def _(x, x_full, weight_t, bias, widths, ks, thresholds, offset):
    return x.new_empty(x.shape[0], weight_t.shape[1])


def _forget(key: int, entry: tuple) -> None:
    """Drop a layer's ``_LAYERS`` entry, unless its key now belongs to another layer's weight."""
    if _LAYERS.get(key) is entry:
        del _LAYERS[key]


@functools.cache  # one plan per distinct layer (counts, widths): a bounded cache would cycle on a deep model
def _plan(widths: tuple, ks: tuple, thresholds: tuple, dtype: torch.dtype) -> GemvPlan:
    """The plan of a layer shape and sparsity (kernels/topk_cpu.py; one per distinct layer: its buffers are reused)."""
    return GemvPlan(list(widths), list(ks) or None, list(thresholds) or None, dtype)


class SparseLinearMethod(UnquantizedLinearMethod):
    """vLLM's unquantized linear method with activation sparsity: creates and loads the weights as vLLM does, then
    keeps the members' weights input-major side by side, ``[d_in, sum(d_out)]`` (the sparse GEMV reads kept rows;
    the masked path reads each member's columns).

    :param ks: TopK mode: each member's count of the whole input; threshold mode: empty
    :param thresholds: threshold mode: each member's threshold; TopK mode: empty
    :param kept_fraction: the largest kept share of any member (decides how many rows the sparse GEMV serves)
    :param gather: a row-parallel TopK layer under tensor parallel: rank the input gathered from every rank
    :param backend: the checkpoint's ``sparse_backend``; "reference" always takes the masked path
    """

    def __init__(self, ks: list[int], thresholds: list[float], kept_fraction: float, gather: bool, backend: str):
        super().__init__()
        self.ks, self.thresholds, self.gather = ks, thresholds, gather
        self.kept_fraction, self.backend = kept_fraction, backend

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        weight = layer.weight.data  # [sum(d_out) local, d_in local]
        layer.register_buffer("acttail_weight_t", weight.t().contiguous(), persistent=False)
        self.widths = list(layer.output_partition_sizes)
        own_gemm = current_platform.is_cpu() and os.environ.get("ACTTAIL_VLLM_DENSE_GEMM") == "1"
        # the masked steps' GEMM: vLLM's own (no widening of 16-bit weights), or masked_gemm_cpu
        max_rows = 0 if self.backend == "reference" else max_sparse_rows(
            "cpu", self.kept_fraction, weight.numel() * weight.element_size(), None if own_gemm else weight.dtype)
        gemms = None
        if own_gemm:
            biases = [None] * len(self.widths) if layer.bias is None else layer.bias.data.split(self.widths)
            gemms = [_MemberGemm(part, part_bias) for part, part_bias in zip(weight.split(self.widths), biases)]
            for gemm in gemms:
                dispatch_cpu_unquantized_gemm(gemm, remove_weight=True)
        key, entry = layer.acttail_weight_t.data_ptr(), (max_rows, gemms)
        _LAYERS[key] = entry
        # the entry (and any packed copies) goes with the layer: an engine shut down in a process that starts another
        weakref.finalize(layer, _forget, key, entry)
        # the [out, in] weight is not used again (vLLM's CPU method drops it too after packing its own copy)
        layer.weight = nn.Parameter(torch.empty(0, dtype=weight.dtype, device=weight.device), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        x_full, offset = None, 0
        if self.gather:
            x_full, offset = tensor_model_parallel_all_gather(x, dim=-1), layer.tp_rank * layer.input_size_per_partition
        op = torch.ops.acttail.sparse_linear if torch.compiler.is_compiling() else _sparse_linear
        y = op(x, x_full, layer.acttail_weight_t, bias, self.widths, self.ks, self.thresholds, offset)
        return y.reshape(*shape[:-1], y.shape[-1])


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every q/k/v/o/gate/up/down projection of a Llama/Mistral/Qwen2/Qwen3 config."""
    heads, kv_heads, hidden = config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kinds = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
             "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
             "mlp.gate_proj": (config.intermediate_size, hidden), "mlp.up_proj": (config.intermediate_size, hidden),
             "mlp.down_proj": (hidden, config.intermediate_size)}
    return {f"model.layers.{i}.{path}": shape for i in range(config.num_hidden_layers) for path, shape in kinds.items()}


def apply_activation_sparsity(model: nn.Module, sparsity: ActivationSparsity, backend: str) -> int:
    """Give every vLLM linear layer of ``model`` that holds a sparse projection a :class:`SparseLinearMethod`.

    Must run after the layers are built and before the weights are loaded. Layers whose members all keep every input
    keep vLLM's own method.

    :returns: how many layers were made sparse
    """
    by_threshold = sparsity.mode == "threshold"
    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        parent, _, child = name.rpartition(".")
        members = [f"{parent}.{part}" for part in FUSED.get(child, (child,))]
        if not all(parse_projection(member) for member in members):
            continue  # lm_head and any layer that is no decoder projection
        specs = [sparsity.modules[member] for member in members]
        if all((spec.threshold == 0) if by_threshold else (spec.keep == spec.in_features) for spec in specs):
            continue
        ks = [] if by_threshold else [spec.keep for spec in specs]
        thresholds = [float(spec.threshold) for spec in specs] if by_threshold else []
        gather = isinstance(layer, RowParallelLinear) and layer.tp_size > 1 and not by_threshold
        kept_fraction = max(spec.keep / spec.in_features for spec in specs)
        layer.quant_method = SparseLinearMethod(ks, thresholds, kept_fraction, gather, backend)
        count += 1
    return count
