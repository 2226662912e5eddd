"""TEAL's block-wise greedy allocation: per decoder block, raise one projection's sparsity at a time, keeping the raise
that changes the block's output least.

Every block starts with its sparsified projections at ``s_min`` (the others stay at 0). Each round tries raising each
projection p by ``step / share_p`` (share_p = p's parameters / the block's seven projections' parameters), so every
accepted raise adds ``step`` to the block's parameter-weighted sparsity; the raise whose block output, under TopK masks at
the candidate sparsities, is closest (L2) to the dense block output over the last 25% of tokens wins and is logged as a
row. The block's input is the dense model's hidden state, so blocks are searched independently.

Cost: a candidate re-runs only what it changes. The q/k/v input (the block's normed input) never changes, so its TopK
ranks are computed once; a candidate at o, gate/up or down starts from the accepted state's cached input of that stage;
a q/k/v candidate's attention output is memoized until a q/k/v raise is accepted; and everything after the attention runs
on the last 25% of tokens only (the tokens the error reads; those stages act per token).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .allocation import GreedyRow, keep_count
from .errors import ExportError
from .kernels.topk import topk_order, topk_sparsify
from .modeling.projections import INPUT_OF, INPUTS, PROJECTION_KINDS, PROJECTION_PATHS
from .weights import Projection

__all__ = ["DEFAULT_STEP", "ERROR_FRACTION", "search_block", "block_shares"]

# Block sparsity added per accepted raise; each block then lands within step / 2 of any target. TEAL's 0.05 / (parameter
# ratio to a d x d matrix) adds 0.0047 per raise on SmolLM2 (0.0041 on Llama-2-7B). 0.01 halves the search time, and on
# SmolLM2 at 50% (8 x 512 evaluation tokens, every token sparse) gave perplexity 31.76 against 32.23 with 0.005.
DEFAULT_STEP = 0.01
ERROR_FRACTION = 0.25  # TEAL: the block-output error is read on the last 25% of each window's tokens
# The stage a projection belongs to, the block's inputs in forward order (q/k/v 0, o 1, gate/up 2, down 3): a candidate
# at a stage recomputes it and the stages after it.
_STAGE = {kind: list(INPUTS).index(INPUT_OF[kind]) for kind in PROJECTION_KINDS}


class _Stop(Exception):
    """Raised by a hook to end a forward once the input it waits for is captured."""


def block_shares(projections: list[Projection]) -> dict[str, float]:
    """Each kind's share of its block's projection parameters (true shapes: k/v are d_kv x d, MLP d_ff x d)."""
    total = sum(p.params for p in projections)
    return {p.kind: p.params / total for p in projections}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Each entry's place in its row's TopK order (0 = largest |x|): ``rank < k`` is exactly :func:`topk_mask`."""
    order = topk_order(x)
    places = torch.arange(x.shape[-1], dtype=torch.int32, device=x.device).expand_as(order)
    return torch.empty(order.shape, dtype=torch.int32, device=x.device).scatter_(-1, order, places)


def _masked(x: torch.Tensor, keep: int, ranks: torch.Tensor | None) -> torch.Tensor:
    if keep >= x.shape[-1]:
        return x
    if ranks is None:
        return topk_sparsify(x, keep)
    return torch.where(ranks < keep, x, torch.zeros((), dtype=x.dtype))


class _BlockSearch:
    """One decoder block's output (last tokens) at given TopK counts, reusing the accepted state's intermediate inputs.

    Stages: 0 attention up to o_proj's input, 1 o_proj, the residual and the second norm, 2 the MLP up to down_proj's
    input, 3 down_proj and the residual. The block is the pre-norm decoder layer of Llama, Mistral, Qwen2 and Qwen3:
    h = x + o(attention(norm1(x))), out = h + down(mlp_inner(norm2(h))); the constructor checks this against the layer.
    """

    def __init__(self, layer: nn.Module, linears: dict[str, nn.Linear], x: torch.Tensor, attention: Callable,
                 dense_out: torch.Tensor):
        # x: [B, T, d], the dense model's block input; dense_out: [B, T, d], its block output
        self.layer, self.linears, self.attention = layer, linears, attention
        tokens = x.shape[1]
        self.tail = slice(tokens - math.ceil(ERROR_FRACTION * tokens), None)
        self.x_tail = x[:, self.tail]
        self.target = dense_out[:, self.tail]
        self.attn_in = layer.input_layernorm(x)
        self.attn_ranks = _ranks(self.attn_in)  # q/k/v always read this input
        self.keep = {kind: m.in_features for kind, m in linears.items()}
        self._keep = self.keep  # the counts the hooks apply during a forward
        self._mlp_ranks = None  # the ranks of the input the next MLP call reads
        self._attention_memo = {}  # (q, k, v keeps) -> o_proj's input and its ranks
        self._captured = None
        self._hooks = [linears[kind].register_forward_pre_hook(self._mask_hook(kind)) for kind in ("q", "k", "v", "gate", "up")]
        self._hooks += [linears[kind].register_forward_pre_hook(self._capture_hook) for kind in ("o", "down")]
        self.state = {}
        self.accept("q", self.keep["q"])  # the dense state, computed from the first stage on
        error = (self.state["out"] - self.target).norm() / self.target.norm()
        if not error < 1e-4:
            self.close()
            raise ExportError(f"teal-greedy: {type(layer).__name__} is not a pre-norm block this search can replay "
                              f"(relative error {error:.2e} against its dense output)")

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _mask_hook(self, kind: str):
        def hook(module, args):
            ranks = self.attn_ranks if _STAGE[kind] == 0 else self._mlp_ranks
            return (_masked(args[0], self._keep[kind], ranks),)
        return hook

    def _capture_hook(self, module, args):
        self._captured = args[0]
        raise _Stop

    def _until_capture(self, call) -> torch.Tensor:
        try:
            call()
        except _Stop:
            return self._captured
        raise ExportError("teal-greedy: the block never called its o_proj / down_proj")

    def _attention_output(self, keep: dict[str, int]) -> dict:
        """o_proj's input (last tokens) and its ranks at these q/k/v counts. Memoized: a q/k/v candidate's attention
        stays valid while the accepted raises are at o or the MLP, which is most rounds."""
        key = (keep["q"], keep["k"], keep["v"])
        if key not in self._attention_memo:
            self._keep = keep
            o_in = self._until_capture(lambda: self.attention(self.attn_in))[:, self.tail]
            self._attention_memo[key] = {"o_in": o_in, "o_ranks": _ranks(o_in)}
        return self._attention_memo[key]

    def _forward(self, keep: dict[str, int], first: int) -> dict:
        """The block's tail output at ``keep``: stages before ``first`` come from the accepted state."""
        state = dict(self.state)
        if first <= 0:
            state.update(self._attention_output(keep))
        if first <= 1:
            o = self.linears["o"]
            h = self.x_tail + F.linear(_masked(state["o_in"], keep["o"], state["o_ranks"]), o.weight, o.bias)
            mlp_in = self.layer.post_attention_layernorm(h)
            state.update(h=h, mlp_in=mlp_in, mlp_ranks=_ranks(mlp_in))  # one sort serves gate and up
        if first <= 2:
            self._keep, self._mlp_ranks = keep, state["mlp_ranks"]
            state.update(down_in=self._until_capture(lambda: self.layer.mlp(state["mlp_in"])), down_ranks=None)
        down = self.linears["down"]
        state["out"] = state["h"] + F.linear(_masked(state["down_in"], keep["down"], state["down_ranks"]), down.weight,
                                             down.bias)
        return state

    def error(self, kind: str, keep: int) -> float:
        """Squared L2 distance of the block's tail output from the dense one with ``kind`` at ``keep`` inputs."""
        out = self._forward({**self.keep, kind: keep}, _STAGE[kind])["out"]
        return float((out - self.target).pow(2).sum())

    def accept(self, kind: str, keep: int) -> None:
        self.keep = {**self.keep, kind: keep}
        if _STAGE[kind] == 0:
            self._attention_memo = {}  # counts only grow: no earlier q/k/v state comes back
        state = self._forward(self.keep, _STAGE[kind])
        if state["down_ranks"] is None:
            state["down_ranks"] = _ranks(state["down_in"])  # for the down candidates of the next rounds
        self.state = state


@torch.inference_mode()
def search_block(layer: nn.Module, projections: list[Projection], x: torch.Tensor, attention: Callable,
                 dense_out: torch.Tensor, kinds: tuple[str, ...], step: float, up_to: float, s_min: float = 0.0,
                 s_max: float = 0.99) -> list[GreedyRow]:
    """Rows of one block's greedy search, from the start to the first row at block sparsity >= ``up_to``.

    :param layer: the dense decoder layer (its q/k/v/o/gate/up/down are plain ``nn.Linear``)
    :param projections: the block's seven projections
    :param x: the block's dense input ``[B, T, d]``
    :param attention: calls ``layer.self_attn`` on a normed input with the other arguments the model passed for ``x``
        (rotary embeddings, mask)
    :param dense_out: the block's dense output ``[B, T, d]``
    :param kinds: the projection kinds the search may raise (the sites); the others stay dense
    :param step: block sparsity added by each raise; projection p moves by ``step / share_p``
    :param up_to: stop after the first row at or above this block sparsity (TEAL searched up to 0.9)
    :param s_min: starting sparsity of the raised kinds
    :param s_max: cap of each projection's sparsity
    """
    if not 0 < step < 1:
        raise ExportError(f"greedy step must be in (0, 1), got {step}")
    shares = block_shares(projections)
    linears = {p.kind: layer.get_submodule(PROJECTION_PATHS[p.kind]) for p in projections}
    sparsity = {kind: s_min if kind in kinds else 0.0 for kind in PROJECTION_KINDS}

    def row() -> GreedyRow:
        return GreedyRow(sum(shares[k] * s for k, s in sparsity.items()), dict(sparsity))

    search = _BlockSearch(layer, linears, x, attention, dense_out)
    try:
        if s_min > 0:
            for kind in kinds:
                search.accept(kind, keep_count(s_min, linears[kind].in_features))
        rows = [row()]
        while rows[-1].block_sparsity < up_to:
            candidates = {kind: min(sparsity[kind] + step / shares[kind], s_max) for kind in kinds if sparsity[kind] < s_max}
            if not candidates:
                break
            errors = {kind: search.error(kind, keep_count(s, linears[kind].in_features)) for kind, s in candidates.items()}
            best = min(errors, key=errors.get)
            sparsity[best] = candidates[best]
            search.accept(best, keep_count(sparsity[best], linears[best].in_features))
            rows.append(row())
    finally:
        search.close()
    return rows
