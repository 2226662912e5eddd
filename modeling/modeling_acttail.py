"""ActTail causal LMs: the installed transformers architecture with activation sparsity at its seven projections.

Shipped flat inside every exported checkpoint (load with ``trust_remote_code=True``). Each class subclasses the installed
``*ForCausalLM`` and swaps the q/k/v/o/gate/up/down ``nn.Linear`` modules named in ``config.activation_sparsity["modules"]``
for :class:`TopKLinear`, which keeps the same parameters, so state-dict keys and weights are those of the base model.
The block's ``mode`` picks TopK (exact count per token) or a calibrated magnitude threshold per projection (TEAL).
"""

import itertools
import math
import operator
import threading

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from transformers.utils import logging

from .activation_sparsity import ActivationSparsity, environment_backend, sparse_prompt_tokens, validate_sparse_backend
from .configuration_acttail import ActTailLlamaConfig, ActTailMistralConfig, ActTailQwen2Config, ActTailQwen3Config
from .projections import INPUT_OF, parse_projection
from .topk import threshold_sparsify, topk_sparsify
from .topk_cpu import DTYPES as CPU_DTYPES
from .topk_cpu import NATIVE_HALF_GEMM, GemvPlan, masked_gemm_cpu, sparse_gemv_cpu

try:  # Triton kernels for GPU decode steps; without Triton, CUDA uses the reference path
    from .topk_triton import INTERPRET as TRITON_INTERPRET
    from .topk_triton import sparse_gemv, sparse_gemv_eager, threshold_cut
except Exception:  # ImportError, or a Triton that cannot initialise on this machine
    sparse_gemv = sparse_gemv_eager = threshold_cut = None
    TRITON_INTERPRET = False

logger = logging.get_logger(__name__)

__all__ = [
    "TopKLinear",
    "SparseGroup",
    "ActTailLlamaForCausalLM",
    "ActTailMistralForCausalLM",
    "ActTailQwen2ForCausalLM",
    "ActTailQwen3ForCausalLM",
]

# A decode step of B rows takes the sparse path while B * (kept fraction) < BATCH_BREAK_EVEN[path]: each row reads its
# own kept weight rows (Polar Sparsity; KNOWLEDGE.md). On the GPU, past 1 the rows together read more bytes than one
# dense pass. On the CPU a row often finds its kept rows in cache, brought there by an earlier row of the step, while
# the dense matmul of a few rows runs several times slower than the one-row GEMV: the sparse GEMV beat the mask + dense
# matmul up to B x kept of about 3 at 7B shapes and about 5 at SmolLM2's, whose weights (up to 7 MB) stay in the
# last-level cache through a step, so rows after the first read them from cache (BENCHMARKS.md, bench_topk_kernels.py
# --rows): CACHED_BREAK_EVEN for CPU weights up to CACHED_WEIGHT_BYTES. 16-bit CPU weights without a native 16-bit
# GEMM make the masked matmul widen them to float32 (``masked_gemm_cpu``), and there the sparse GEMV still beat it by
# 1.2-1.4x at B x kept = 8 (bfloat16, SmolLM2 and 7B shapes, one thread): WIDENED_BREAK_EVEN.
BATCH_BREAK_EVEN = {"triton": 1.0, "cpu": 3.0}
CACHED_BREAK_EVEN = 5.0
CACHED_WEIGHT_BYTES = 8 * 2**20
WIDENED_BREAK_EVEN = 8.0


def max_sparse_rows(path: str, kept_fraction: float, weight_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> int:
    """The most rows a decode step may have and still take ``path``'s sparse GEMV ("triton" or "cpu"), for a group
    whose widest member keeps ``kept_fraction`` of its inputs and whose weights take ``weight_bytes`` in ``dtype``."""
    break_even = BATCH_BREAK_EVEN[path]
    if path == "cpu" and NATIVE_HALF_GEMM.get(dtype) is False:
        break_even = WIDENED_BREAK_EVEN
    elif path == "cpu" and weight_bytes is not None and weight_bytes <= CACHED_WEIGHT_BYTES:
        break_even = CACHED_BREAK_EVEN
    return math.ceil(break_even / kept_fraction) - 1


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The decode path for weights on ``device`` in ``dtype``: "triton", "cpu" or "reference".

    An explicit backend wins; "auto" reads ACTTAIL_SPARSE_BACKEND, then picks by what is installed. A backend that
    cannot run here falls back to the reference path with one warning.
    """
    if requested == "auto":
        requested = environment_backend()
    triton_ok = sparse_gemv is not None and (device.type == "cuda" or TRITON_INTERPRET) and dtype in (
        torch.float16, torch.bfloat16, torch.float32)
    cpu_ok = device.type == "cpu" and dtype in CPU_DTYPES
    if requested == "auto":
        return "triton" if triton_ok and device.type == "cuda" else "cpu" if cpu_ok else "reference"
    if (requested == "triton" and not triton_ok) or (requested == "cpu" and not cpu_ok):
        why = "Triton is not installed" if requested == "triton" and sparse_gemv is None else f"{device.type} {dtype}"
        logger.warning_once(f"sparse_backend={requested!r} cannot run here ({why}): decode steps use the reference path")
        return "reference"
    return requested


_GROUP = operator.attrgetter("group")
_SETTINGS = operator.attrgetter("keep", "threshold")


class SparseGroup:
    """Sparse projections that read one input (q/k/v, gate/up, or one alone), run as one sparse decode per step.

    Built by ``prepare_sparse_decode``, which also stores the weights input-major: the members' weights become column
    blocks of one ``[d_in, sum(d_out)]`` tensor, so one call finds every member's kept set and computes all outputs
    (one Triton launch on GPU, one ``embedding_bag`` on CPU: kernels/topk_cpu.py).
    """

    def __init__(self, members: list["TopKLinear"], path: str):
        self.members, self.path = members, path
        self.widths = [m.out_features for m in members]
        self.ks = [m.keep for m in members]
        self.by_threshold = members[0].threshold is not None
        self.kept_fraction = max(m.keep / m.in_features for m in members)
        weight = members[0].weight
        with torch.no_grad():
            self.weight_t = torch.cat([m.weight.t() for m in members], dim=1).contiguous()
            self.bias = None
            if any(m.bias is not None for m in members):
                self.bias = torch.cat([m.bias if m.bias is not None else weight.new_zeros(m.out_features)
                                       for m in members])
            start = 0
            for m, width in zip(members, self.widths):  # the members' weights and biases become views: no second
                m.weight.data = self.weight_t[:, start:start + width].t()  # copy, and new values loaded into them
                if m.bias is not None:  # (load_state_dict copies in place) reach the group
                    m.bias.data = self.bias[start:start + width]
                start += width
        # the most rows a decode step may have and still take the sparse path (read at every step: computed once)
        self.max_rows = max_sparse_rows(path, self.kept_fraction,
                                        self.weight_t.numel() * self.weight_t.element_size(), self.weight_t.dtype)
        self.thresholds = [m.threshold for m in members] if self.by_threshold else None
        self.cut = threshold_cut(self.thresholds, weight.dtype, weight.device) \
            if self.by_threshold and path == "triton" else None
        self.cpu_plan = GemvPlan(self.widths, None if self.by_threshold else self.ks, self.thresholds, weight.dtype) \
            if path == "cpu" else None
        # where the members keep their weights and biases, read at every step (C-level maps: ~1 us a group, where a
        # loop over ``m.weight`` took 7 us, 1.7% of a SmolLM2 step): a moved or replaced one shows as another pointer
        self._slots = [(m._parameters, name) for m in members for name in ("weight", "bias")
                       if m._parameters.get(name) is not None]
        self._planned = [self] * len(members)
        self.layout = self._pointers()
        self.settings = list(map(_SETTINGS, members))  # counts or thresholds set on a member later show too
        # this decode step's outputs, computed together by the parent's pre-hook, each taken once by its member (kept
        # here, not on the modules: nn.Module.__setattr__ costs microseconds, ~400 times a step), per thread: two
        # threads decoding through one model must not take each other's
        self.step = threading.local()

    def _pointers(self) -> tuple[int, ...]:
        return tuple(map(torch.Tensor.data_ptr, itertools.starmap(dict.__getitem__, self._slots)))

    def is_current(self) -> bool:
        """Whether the members still hold the weights and biases this group laid out (not moved, cast or replaced),
        and the counts or thresholds it planned with."""
        return (list(map(_GROUP, self.members)) == self._planned and self._pointers() == self.layout
                and list(map(_SETTINGS, self.members)) == self.settings)

    def typical_step(self, rows: int) -> torch.Tensor:
        """A random decode step ``[rows, 1, d_in]`` keeping about the planned fraction of inputs, to autotune on: with
        thresholds, Gaussian entries scaled so that the first member keeps its share (a calibrated threshold is tiny
        next to unit Gaussians, which would keep nearly all)."""
        first = self.members[0]
        x = torch.randn(rows, 1, first.in_features, dtype=torch.float32, device=first.weight.device)
        if self.by_threshold and first.threshold > 0:
            kept = torch.tensor(min(first.keep / first.in_features, 0.999), dtype=torch.float64)
            x *= first.threshold / float(torch.special.ndtri(1 - kept / 2))  # P(|z| > ndtri(1 - p/2)) = p
        return x.to(first.weight.dtype)

    def wins(self, x: torch.Tensor) -> bool:
        """Whether x is a decode step the sparse path serves: ``[B, 1, d]`` with few enough rows to beat dense, in the
        weights' dtype (not under autocast), and the group still current (weights not replaced since planning)."""
        return (x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= self.max_rows and x.dtype == self.weight_t.dtype
                and (torch.compiler.is_compiling() or self.is_current()))  # a traced graph reads no pointers

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every member's output for the decode step x (``[B, 1, d_in]``): ``[B, 1, d_out]`` each."""
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if self.path == "triton":
            gemv = sparse_gemv if torch.compiler.is_compiling() else sparse_gemv_eager
            y = gemv(rows, self.weight_t, self.bias, self.widths, [] if self.by_threshold else self.ks, self.cut,
                     self.kept_fraction)
        else:
            y = sparse_gemv_cpu(rows, self.weight_t, self.cpu_plan, self.bias)
        y = y.reshape(x.shape[0], 1, y.shape[-1])  # one view, no unsqueeze per member: a few us of a ~40 us call
        return [y] if len(self.widths) == 1 else list(y.split(self.widths, dim=-1))


class PromptRows(threading.local):
    """Which tokens of the model's current call a fractional ``prefill`` sparsifies, where the call is a padded batch:
    each row's last ceil(f * n) of its own n tokens, as if the prompt ran alone (and as vLLM counts each request's own
    prompt). ``rows`` is ``[batch, tokens]`` bool during such a call (set by the model's forward pre-hook), else None;
    per thread, as two threads may run the model at once."""

    def __init__(self):
        self.rows = None

    @staticmethod
    def of(prefill: float, real: torch.Tensor) -> torch.Tensor:
        """``[batch, tokens]`` bool from ``real``, the attention mask's ``[batch, tokens]`` of the call's own tokens."""
        from_end = real.flip(-1).cumsum(-1).flip(-1)  # each position: how many real tokens from it to the row's end
        counts = torch.tensor([sparse_prompt_tokens(prefill, int(n)) for n in real.sum(-1)], device=real.device)
        return real & (from_end <= counts[:, None])


class TopKLinear(nn.Linear):
    """``nn.Linear`` whose input keeps only its ``keep`` largest-magnitude entries per token, or, with a ``threshold``
    (mode "threshold"), only the entries with |x| > threshold.

    ``prefill`` decides which tokens of a multi-token call (a prompt, or a perplexity window) are sparsified:
    "sparse" all of them, "dense" none, a fraction f the last ceil(f * S) (of each row's own tokens in a padded batch:
    :class:`PromptRows`). Single-token calls (decode steps) are always sparse. Multi-token calls, and decode steps
    before ``prepare_sparse_decode``, use the mask + dense matmul (the reference path). Prepared decode steps read
    only the kept weight rows through the module's :class:`SparseGroup`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, prefill="sparse",
                 threshold: float | None = None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.keep = keep
        self.prefill = prefill
        self.threshold = threshold  # None: TopK; a float: zero |x| <= threshold
        self.group = None  # SparseGroup serving this projection's decode steps (prepare_sparse_decode), or None
        self.slot = 0  # this projection's place among its group's members
        self.prompt = None  # the model's PromptRows (set_activation_sparsity), for a fractional prefill

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: int, prefill, threshold: float | None = None) -> "TopKLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, keep, prefill, threshold,
                     device="meta")
        module.weight, module.bias = linear.weight, linear.bias  # share, never copy
        return module

    @property
    def sparse(self) -> bool:
        """Whether decode steps may take a sparse path: a threshold above 0, or TopK with fewer than all inputs kept."""
        return self.threshold > 0 if self.threshold is not None else self.keep < self.in_features

    def sparsify_all(self, x: torch.Tensor) -> torch.Tensor:
        """Sparsify every token of x, by TopK or by the threshold."""
        return topk_sparsify(x, self.keep) if self.threshold is None else threshold_sparsify(x, self.threshold)

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., S, d_in]
        if not self.sparse:
            return x  # x itself, not a copy: a copy's other alignment can change a dense GEMM's rounding
        if x.dim() < 2 or x.shape[-2] == 1 or self.prefill == "sparse":
            return self.sparsify_all(x)
        if self.prefill == "dense":
            return x
        rows = self.prompt.rows if self.prompt is not None else None
        if rows is not None and rows.shape == x.shape[:-1]:  # a padded batch: each row's own last tokens
            return torch.where(rows.unsqueeze(-1), self.sparsify_all(x), x)
        tokens = x.shape[-2]
        sparse_tokens = sparse_prompt_tokens(self.prefill, tokens)
        head, tail = x.split([tokens - sparse_tokens, sparse_tokens], dim=-2)
        return torch.cat([head, self.sparsify_all(tail)], dim=-2)

    def _apply(self, fn, recurse=True):
        self.group = None  # new device, dtype or storage: prepare_sparse_decode plans again
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        outputs = getattr(group.step, "outputs", None) if group is not None else None
        if outputs is not None and outputs[self.slot] is not None:
            y, outputs[self.slot] = outputs[self.slot], None  # the parent's pre-hook ran the group
            return y
        if group is not None and len(group.members) == 1 and group.wins(x):
            return group(x)[0]
        x = self.sparsify(x)
        if group is not None and group.path == "cpu":  # the weight is a view of the group's input-major layout
            y = masked_gemm_cpu(x.reshape(-1, x.shape[-1]), self.weight.t(), self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        sparsity = f"keep={self.keep}" if self.threshold is None else f"threshold={self.threshold:.6g}"
        path = self.group.path if self.group is not None else "reference"
        return f"{super().extra_repr()}, {sparsity}, prefill={self.prefill!r}, decode={path!r}"


def _run_group_pre_hook(group: SparseGroup):
    """A forward pre-hook for the module that hands the group its input (self_attn, mlp): run the group once for a
    decode step and leave each member its output, so q/k/v (gate/up) share one selection and one launch."""

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if group.wins(x):  # a decode step, and the group still planned (a moved model is not) and current
            group.step.outputs = group(x)

    return hook


def _clear_group_hook(group: SparseGroup):
    """A forward hook after the parent: drop outputs a member did not take (a parent that skipped a projection)."""

    def hook(module, args, output):
        group.step.outputs = None

    return hook


class ActTailMixin:
    """Applies ``config.activation_sparsity`` after the base model is built; ``set_activation_sparsity`` re-applies one."""

    def __init__(self, config):
        super().__init__(config)
        self._prompt = PromptRows()
        self.register_forward_pre_hook(self._mark_padded_prompt, with_kwargs=True)
        self.register_forward_hook(self._clear_padded_prompt)
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
        for module in self.topk_modules().values():
            module.prompt = self._prompt
        self.config.activation_sparsity = sparsity.to_dict()
        self.set_sparse_backend(self.config.sparse_backend)

    def set_sparse_backend(self, backend: str) -> None:
        """Choose how decode steps run: "auto", "triton", "cpu" or "reference" (an explicit choice wins over the
        environment variable ACTTAIL_SPARSE_BACKEND, which "auto" reads). Takes effect at ``prepare_sparse_decode``."""
        validate_sparse_backend(backend)
        self.config.sparse_backend = backend
        self._drop_decode_plan()

    def _drop_decode_plan(self) -> None:
        for handle in getattr(self, "_decode_hooks", []):
            handle.remove()
        self._decode_hooks = []
        for module in self.topk_modules().values():
            module.group = None

    def save_pretrained(self, *args, **kwargs):
        """transformers' ``save_pretrained``, after a planned sparse decode gives each projection a weight and bias of
        its own again (the plan keeps them as views of its input-major layout, which transformers cannot save); the
        next ``generate`` plans again."""
        planned = {m.group for m in self.topk_modules().values() if m.group is not None}
        self._drop_decode_plan()
        with torch.no_grad():
            while planned:  # one group at a time: its layout is freed before the next group's copies are made
                for m in planned.pop().members:
                    m.weight.data = m.weight.data.contiguous()
                    if m.bias is not None:
                        m.bias.data = m.bias.data.clone()
        return super().save_pretrained(*args, **kwargs)

    def decode_groups(self) -> list[tuple[nn.Module | None, list[TopKLinear]]]:
        """The sparse projections grouped by the vector they read (``projections.INPUT_OF``: q/k/v, gate/up, o, down
        of each layer): (the module that hands the group its input, for a group of several, else None; the members)."""
        groups = {}
        for name, module in self.topk_modules().items():
            if module.sparse:
                parsed = parse_projection(name)
                groups.setdefault((parsed[0], INPUT_OF[parsed[1]]) if parsed else name, []).append((name, module))
        return [(self.get_submodule(members[0][0].rpartition(".")[0]) if len(members) > 1 else None,
                 [module for _, module in members]) for members in groups.values()]

    def prepare_sparse_decode(self) -> None:
        """Plan the sparse decode steps: choose each group's path (see ``resolve_backend``), store its weights
        input-major, and hook the modules that hand shared inputs to their projections.

        ``generate`` calls it. Call it yourself before decoding in your own loop or before ``torch.compile`` /
        CUDA-graph capture (it also warms the Triton autotuner), and again after moving the model or replacing
        weight data; until then decode steps take the reference path. A plan still current is kept.
        """
        current = [m.group for m in self.topk_modules().values() if m.sparse]
        if current and all(group is not None and group.is_current() for group in current):
            return
        self._drop_decode_plan()
        for parent, members in self.decode_groups():
            weight = members[0].weight
            offloaded = any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in members)
            same_place = all(m.weight.device == weight.device and m.weight.dtype == weight.dtype for m in members)
            path = resolve_backend(self.config.sparse_backend, weight.device, weight.dtype)
            if path == "reference" or offloaded or weight.device.type == "meta" or not same_place:
                continue
            group = SparseGroup(members, path)
            for slot, member in enumerate(members):
                member.group, member.slot = group, slot
            if parent is not None:
                self._decode_hooks += [
                    parent.register_forward_pre_hook(_run_group_pre_hook(group), with_kwargs=True),
                    parent.register_forward_hook(_clear_group_hook(group)),
                ]
            if path == "triton" and weight.device.type == "cuda":  # autotune now, for every batch the path serves,
                for rows in range(1, group.max_rows + 1):  # before any graph capture
                    group(group.typical_step(rows))

    def generate(self, *args, **kwargs):
        self.prepare_sparse_decode()
        return super().generate(*args, **kwargs)

    def _mark_padded_prompt(self, module, args, kwargs) -> None:
        """Forward pre-hook (a hook, not a ``forward`` override: generate reads forward's signature): in a padded
        multi-token call under a fractional ``prefill``, tell the projections each row's own tokens
        (:class:`PromptRows`), so that a prompt's result does not depend on its batch."""
        self._prompt.rows = None
        prefill = (self.config.activation_sparsity or {}).get("prefill", "sparse")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        if isinstance(prefill, str) or mask is None or mask.dim() != 2 or tokens is None or tokens.shape[1] < 2:
            return
        real = mask[:, -tokens.shape[1]:].bool()  # a 2-D mask covers the cached tokens too: this call's are last
        if not bool(real.all()):
            self._prompt.rows = PromptRows.of(prefill, real)

    def _clear_padded_prompt(self, module, args, output) -> None:
        self._prompt.rows = None


class ActTailLlamaForCausalLM(ActTailMixin, LlamaForCausalLM):
    config_class = ActTailLlamaConfig


class ActTailMistralForCausalLM(ActTailMixin, MistralForCausalLM):
    config_class = ActTailMistralConfig


class ActTailQwen2ForCausalLM(ActTailMixin, Qwen2ForCausalLM):
    config_class = ActTailQwen2Config


class ActTailQwen3ForCausalLM(ActTailMixin, Qwen3ForCausalLM):
    config_class = ActTailQwen3Config
