"""ActTail causal LMs: the installed transformers architecture with activation sparsity at its seven projections.

Shipped flat inside every exported checkpoint (load with ``trust_remote_code=True``). Each class subclasses the installed
``*ForCausalLM`` and swaps the q/k/v/o/gate/up/down ``nn.Linear`` modules named in ``config.activation_sparsity["modules"]``
for :class:`TopKLinear`, which keeps the same parameters, so state-dict keys and weights are those of the base model.
The block's ``mode`` picks TopK (exact count per token) or a calibrated magnitude threshold per projection (TEAL).
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .activation_sparsity import ActivationSparsity, validate_sparse_backend
from .configuration_acttail import ActTailLlamaConfig, ActTailMistralConfig, ActTailQwen2Config, ActTailQwen3Config
from .projections import parse_projection
from .topk import threshold_sparsify, topk_sparsify
from .topk_cpu import select_cpu, sparse_linear_cpu

try:  # Triton kernels for CUDA decode steps; without Triton, CUDA uses the reference path
    from .topk_triton import sparse_gemv, topk_select
except Exception:  # ImportError, or a Triton that cannot initialise on this machine
    topk_select = sparse_gemv = None

__all__ = [
    "TopKLinear",
    "ActTailLlamaForCausalLM",
    "ActTailMistralForCausalLM",
    "ActTailQwen2ForCausalLM",
    "ActTailQwen3ForCausalLM",
]

# Projections that read the same vector share one selection per decode step (each keeps its own k).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Decode steps with at most this many rows take the sparse paths; more rows read most weight rows anyway.
MAX_DECODE_ROWS = 8


def _select_triton(rows: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, list[int]]:
    return topk_select(rows, ks), [sum(ks[:i]) for i in range(len(ks))]


# backend -> (selection for a group's ks: (indices, start column of each member), GEMV over the kept rows of weight_t)
DECODE_PATHS = {
    "cpu": (select_cpu, sparse_linear_cpu),
    "triton": (_select_triton, sparse_gemv),
}


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The decode path for tensors like x (device, dtype) under ``backend``: "auto" picks by what is installed."""
    backend = os.environ.get("ACTTAIL_SPARSE_BACKEND", backend)
    # embedding_bag sums half-precision bags in half precision: those stay on the reference path on CPU
    cpu_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
    if backend == "auto":
        return "triton" if x.is_cuda and topk_select is not None else "cpu" if cpu_ok else "reference"
    if (backend == "triton" and topk_select is None) or (backend == "cpu" and not cpu_ok):
        return "reference"
    return backend


class SharedSelection:
    """One TopK selection per decode step for projections that read the same input tensor (q/k/v; gate/up).

    The first member called with a new input computes the selection for every member's k; the others reuse it while the
    input is the same tensor object. After the last member the cache is cleared, so nothing outlives the step (and a
    compiled step has no extra outputs).
    """

    def __init__(self, ks: list[int]):
        self.ks = ks
        self._input = self._selection = None
        self._uses = 0

    def select(self, x: torch.Tensor, rows: torch.Tensor, backend: str) -> tuple[torch.Tensor, list[int]]:
        if self._input is not x:
            self._input, self._selection, self._uses = x, DECODE_PATHS[backend][0](rows, self.ks), 0
        selection = self._selection
        self._uses += 1
        if self._uses == len(self.ks):
            self._input = self._selection = None
        return selection


class TopKLinear(nn.Linear):
    """``nn.Linear`` whose input keeps only its ``keep`` largest-magnitude entries per token, or, with a ``threshold``
    (mode "threshold"), only the entries with |x| > threshold.

    ``prefill`` decides which tokens of a multi-token call (a prompt, or a perplexity window) are sparsified:
    "sparse" all of them, "dense" none, a fraction f the last ceil(f * S). Single-token calls (decode steps) are always
    sparse. Multi-token calls use the mask + dense matmul. TopK decode steps read only the kept rows of the weight stored
    input-major (see :meth:`make_input_major`) on the path ``backend`` picks (see ``DECODE_PATHS``); threshold decode
    steps use the mask + dense matmul (the sparse paths are built for an exact k per row).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, prefill="sparse",
                 threshold: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.keep = keep
        self.prefill = prefill
        self.threshold = threshold  # None: TopK; a float: zero |x| <= threshold
        self.backend = "auto"
        self.decode_path = None  # "triton" | "cpu" | "reference", chosen at the first decode step (see plan_decode)
        self.shared = None  # SharedSelection with the other projections reading this input, or None
        self.shared_slot = 0  # this projection's place in ``shared.ks``

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: int, prefill, threshold: float | None = None) -> "TopKLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, keep, prefill, threshold,
                     device="meta")
        module.weight, module.bias = linear.weight, linear.bias  # share, never copy
        return module

    @property
    def topk_sparse(self) -> bool:
        """Whether decode steps may take a sparse TopK path: TopK mode and fewer than all inputs kept."""
        return self.threshold is None and self.keep < self.in_features

    def sparsify_all(self, x: torch.Tensor) -> torch.Tensor:
        """Sparsify every token of x, by TopK or by the threshold."""
        return topk_sparsify(x, self.keep) if self.threshold is None else threshold_sparsify(x, self.threshold)

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., S, d_in]
        if x.dim() < 2 or x.shape[-2] == 1 or self.prefill == "sparse":
            return self.sparsify_all(x)
        if self.prefill == "dense":
            return x
        tokens = x.shape[-2]
        sparse_tokens = math.ceil(self.prefill * tokens)
        head, tail = x.split([tokens - sparse_tokens, sparse_tokens], dim=-2)
        return torch.cat([head, self.sparsify_all(tail)], dim=-2)

    def is_input_major(self) -> bool:
        """Whether the weight is stored as a contiguous ``[in, out]`` tensor (``weight`` is its transposed view)."""
        return self.weight.stride() == (1, self.out_features)

    @torch.no_grad()
    def make_input_major(self) -> None:
        """Store the weight input-major, in place of the ``[out, in]`` storage (no extra memory once the old is freed).

        ``weight`` keeps its shape and values, so the dense matmul, state dicts and hooks see the same parameter.
        """
        if not self.is_input_major():
            self.weight.data = self.weight.data.t().contiguous().t()

    def plan_decode(self) -> str:
        """Choose this projection's decode path once (by backend, device, dtype) and make the weight ready for it.

        Decode steps reuse the choice: a step is ~200 projections of well under a millisecond each on a small model, so
        per-call checks cost real time. Moving the module (``.to``) or ``set_sparse_backend`` clears it.
        """
        path = resolve_backend(self.backend, self.weight)
        offloaded = getattr(getattr(self, "_hf_hook", None), "offload", False)  # accelerate swaps the weight per call
        if path != "reference" and (offloaded or self.weight.device.type == "meta"):
            path = "reference"
        if path != "reference":
            self.make_input_major()
        self.decode_path = path
        return path

    def _apply(self, fn, recurse=True):
        self.decode_path = None  # new device or dtype: choose again at the next decode step
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, S, d_in]; decode steps (S == 1, few rows) of a sparse projection take the planned path
        if x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= MAX_DECODE_ROWS and self.topk_sparse:
            path = self.decode_path
            if path is None:
                # No layout change inside a traced graph: call model.prepare_sparse_decode() before torch.compile.
                path = "reference" if torch.compiler.is_compiling() else self.plan_decode()
            if path != "reference":
                return self._sparse_decode(x, path)
        return F.linear(self.sparsify(x), self.weight, self.bias)

    def _sparse_decode(self, x: torch.Tensor, path: str) -> torch.Tensor:
        select, gemv = DECODE_PATHS[path]
        rows = x.reshape(-1, self.in_features)  # [B, d_in]
        if self.shared is not None:
            selection, starts = self.shared.select(x, rows, path)
            start = starts[self.shared_slot]
        else:
            selection, start = select(rows, [self.keep])[0], 0
        y = gemv(rows, selection[:, start:start + self.keep], self.weight.t(), self.bias)  # [B, d_out]
        return y.unsqueeze(1)

    def extra_repr(self) -> str:
        sparsity = f"keep={self.keep}" if self.threshold is None else f"threshold={self.threshold:.6g}"
        return f"{super().extra_repr()}, {sparsity}, prefill={self.prefill!r}, backend={self.backend!r}"


class ActTailMixin:
    """Applies ``config.activation_sparsity`` after the base model is built; ``set_activation_sparsity`` re-applies one."""

    def __init__(self, config):
        super().__init__(config)
        if config.activation_sparsity is not None:
            self.set_activation_sparsity(config.activation_sparsity)

    def topk_modules(self) -> dict[str, TopKLinear]:
        return {name: module for name, module in self.named_modules() if isinstance(module, TopKLinear)}

    def set_activation_sparsity(self, block: dict) -> None:
        """Swap or update the sparse projections named in ``block["modules"]`` (keep = in_features, or threshold 0 in
        mode "threshold", makes one dense). Switches between the modes "topk" and "threshold".

        The block is checked (:class:`ActivationSparsity`) and then checked against this model: every q/k/v/o/gate/up/down
        projection of every decoder layer listed, with its in_features, and the effective sparsity the keeps give.

        :param block: an ``activation_sparsity`` block, as in config.json
        """
        sparsity = ActivationSparsity.from_dict(block)
        linears = {name: m for name, m in self.named_modules() if parse_projection(name) and isinstance(m, nn.Linear)}
        sparsity.check_model({name: (m.out_features, m.in_features) for name, m in linears.items()})
        by_threshold = sparsity.mode == "threshold"
        for name, spec in sparsity.modules.items():
            module, threshold = linears[name], float(spec.threshold) if by_threshold else None
            if isinstance(module, TopKLinear):
                module.keep, module.prefill, module.threshold = spec.keep, sparsity.prefill, threshold
            else:
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent), child, TopKLinear.from_linear(module, spec.keep, sparsity.prefill, threshold))
        self.config.activation_sparsity = sparsity.to_dict()
        self.set_sparse_backend(self.config.sparse_backend)
        self._share_selections()

    def set_sparse_backend(self, backend: str) -> None:
        """Choose how decode steps run: "auto", "triton", "cpu" or "reference".

        The environment variable ACTTAIL_SPARSE_BACKEND, read when a projection plans its path, overrides it.
        """
        validate_sparse_backend(backend)
        for module in self.topk_modules().values():
            module.backend, module.decode_path = backend, None
        self.config.sparse_backend = backend

    def _share_selections(self) -> None:
        """Give the sparse projections that read one input (``SHARED_INPUTS``) a common SharedSelection."""
        modules = self.topk_modules()
        for module in modules.values():
            module.shared, module.shared_slot = None, 0
        parents = {name.rpartition(".")[0] for name in modules}
        for parent in parents:
            for names in SHARED_INPUTS:
                members = [modules.get(f"{parent}.{name}") for name in names]
                members = [m for m in members if m is not None and m.topk_sparse]
                if len(members) < 2:
                    continue
                shared = SharedSelection([m.keep for m in members])
                for slot, member in enumerate(members):
                    member.shared, member.shared_slot = shared, slot

    def prepare_sparse_decode(self) -> None:
        """Plan every sparse projection's decode path now (weights stored input-major where the path needs it).

        ``generate`` calls it. Call it yourself before ``torch.compile`` of a forward you drive, and after replacing
        weight data yourself; eager forwards otherwise plan at their first decode step.
        """
        for module in self.topk_modules().values():
            if module.topk_sparse:
                module.plan_decode()

    def generate(self, *args, **kwargs):
        self.prepare_sparse_decode()
        return super().generate(*args, **kwargs)


class ActTailLlamaForCausalLM(ActTailMixin, LlamaForCausalLM):
    config_class = ActTailLlamaConfig


class ActTailMistralForCausalLM(ActTailMixin, MistralForCausalLM):
    config_class = ActTailMistralConfig


class ActTailQwen2ForCausalLM(ActTailMixin, Qwen2ForCausalLM):
    config_class = ActTailQwen2Config


class ActTailQwen3ForCausalLM(ActTailMixin, Qwen3ForCausalLM):
    config_class = ActTailQwen3Config
