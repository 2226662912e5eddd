"""Calibration on text: the source model run on calibration windows, one decoder layer at a time.

The threshold mode takes t_p = the s_p-quantile of |x| at projection p's input (TEAL), calibrated in a forward in
which every earlier input is already thresholded; the teal-greedy search (greedy.py) starts from each decoder block's
dense input, output and attention arguments on the first windows; the ``calibrated`` allocation reads Fisher
loss-increase curves from forward and backward passes (fisher.py).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from .allocation import SITES, GreedyRow, ModuleSparsity
from .errors import ExportError
from .evaluate import calibration_windows
from .fisher import topk_curves
from .greedy import search_block
from .kernels.topk import threshold_sparsify
from .layerwise import LayerwiseModel
from .modeling.projections import INPUT_OF, PROJECTION_PATHS
from .weights import SourceModel

__all__ = [
    "DEFAULT_WINDOWS",
    "DEFAULT_SEQLEN",
    "DEFAULT_GREEDY_WINDOWS",
    "SAMPLES_PER_INPUT",
    "DEFAULT_CURVE_WINDOWS",
    "CURVE_PASS_WINDOWS",
    "THRESHOLD_CHUNK_TOKENS",
    "calibration_ids",
    "Calibration",
]

# TEAL calibrated on 10 windows x 2048 tokens on a GPU; 8 x 512 keeps the forward at ~10 s for SmolLM2 on 2 CPU cores.
DEFAULT_WINDOWS = 8
DEFAULT_SEQLEN = 512
# The greedy search replays every block ~7 times per row: its cost is proportional to its tokens (see greedy.py).
DEFAULT_GREEDY_WINDOWS = 1
# The calibrated allocation's curves are sums over tokens: read from DEFAULT_CURVE_WINDOWS windows, CURVE_PASS_WINDOWS
# a forward and backward pass (a pass stores every layer's input: its memory grows with the windows of a pass, its
# time with all of them). On SmolLM2, 4 windows beat 2 on two texts at 30, 50 and 70% (docs/RESULTS.md).
DEFAULT_CURVE_WINDOWS = 4
CURVE_PASS_WINDOWS = 2
# |x| entries a threshold is the quantile of: from n samples the quantile's level has a standard error of about
# sqrt(s (1 - s) / n) = 0.001 (torch.quantile refuses more than 16 M elements; 8 x 512 tokens x 1536 inputs are 6 M).
SAMPLES_PER_INPUT = 1 << 18
# Calibration tokens the threshold pass runs through a layer at once. The default windows (8 x 512) are one chunk, one
# forward; more are run in chunks, so that a layer's intermediates (a 7B MLP's are 2.7x its hidden states, attention's
# can be windows x heads x seqlen^2) are one chunk's, at the cost of re-running parts of the layer (see thresholds).
THRESHOLD_CHUNK_TOKENS = 4096


def calibration_ids(source: SourceModel, text: str, windows: int, seqlen: int) -> torch.Tensor:
    """``[windows, seqlen]`` token ids from the end of ``text`` (see :func:`acttail_export.text.read_text`), disjoint
    from the evaluation windows that ``eval`` takes from its start."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError) as e:
        raise ExportError(f"calibration needs the model's tokenizer, and {source.folder} has none that loads: {e}") from e
    return calibration_windows(tokenizer, text, seqlen, windows)


class Calibration:
    """The dense source model and calibration windows, for the threshold mode, the teal-greedy search and the
    ``calibrated`` allocation. The model runs one decoder layer at a time (see :mod:`acttail_export.layerwise`): peak
    memory is one layer plus the windows' activations.

    :param source: the model (its safetensors files are read in float32 on CPU, one layer at a time)
    :param ids: ``[windows, seqlen]`` calibration token ids (see :func:`calibration_ids`)
    :param text: what the ids were cut from, for the record
    :param greedy_windows: how many of the windows the greedy search replays
    :param samples: |x| entries per input a threshold is the quantile of
    :param curve_windows: how many of the windows the ``calibrated`` allocation's curves read
    :param curve_pass: how many of those a forward and backward pass reads at a time
    :param chunk_tokens: calibration tokens the threshold pass runs through a layer at once (whole windows, at least one)
    """

    def __init__(self, source: SourceModel, ids: torch.Tensor, text: str = "token ids",
                 greedy_windows: int = DEFAULT_GREEDY_WINDOWS, samples: int = SAMPLES_PER_INPUT, progress: bool = True,
                 curve_windows: int = DEFAULT_CURVE_WINDOWS, curve_pass: int = CURVE_PASS_WINDOWS,
                 chunk_tokens: int = THRESHOLD_CHUNK_TOKENS):
        self.source, self.ids, self.text, self.samples, self.progress = source, ids, text, samples, progress
        self.chunk_windows = max(1, chunk_tokens // ids.shape[1])
        self.greedy_windows = min(greedy_windows, len(ids))
        self.curve_windows, self.curve_pass = min(curve_windows, len(ids)), curve_pass
        self.model = LayerwiseModel(source)
        self.by_layer = defaultdict(list)
        for p in source.projections:
            self.by_layer[p.layer].append(p)
        self.layers = sorted(self.by_layer)
        self._rows: dict[tuple, tuple[float, dict[int, list[GreedyRow]]]] = {}
        self._curves: dict[str, np.ndarray] | None = None

    def _bar(self, desc: str):
        return tqdm(total=len(self.model.layers), desc=desc, unit="layer", disable=None if self.progress else True)

    @torch.inference_mode()
    def thresholds(self, modules: dict[str, ModuleSparsity]) -> dict[str, float]:
        """t_p = the s_p-quantile of |x| at p's input over the calibration tokens (0 keeps every input).

        In forward order, each input is thresholded as soon as its threshold is known, so later thresholds see the
        activations the sparse model produces. (Quantiles of the dense model's activations, as TEAL took them, left
        SmolLM2 at 0.528 measured sparsity on held-out text for a 0.5 target.) A quantile needs every calibration
        token's input: with one chunk of windows (the default) that is one forward; with several, each chunk runs the
        layer until the first input whose threshold is unknown, hands in its samples and stops, and the layer is run
        again once that threshold is known (up to 2.5x a layer's forward, for one chunk's intermediates in memory).
        Chunks sample the same entries a single batch would, so the thresholds are the same up to float rounding.
        """
        chunks = [self.model.embed(ids) for ids in self.ids.split(self.chunk_windows)]  # (hidden, calls) per chunk
        tokens = [len(hidden) * hidden.shape[1] for hidden, _ in chunks]
        generator = torch.Generator().manual_seed(0)
        thresholds: dict[str, float] = {}

        def hook(quantiles: _Quantiles, name: str, sparsity: float, key: str, chunk: int):
            def threshold(module, args):
                x = args[0]
                if name not in thresholds:
                    if not quantiles.add(key, chunk, x):
                        raise _Stop  # the other chunks' inputs are still to come
                    thresholds[name] = quantiles.at(key, sparsity)
                return (threshold_sparsify(x, thresholds[name]),)
            return threshold

        with self._bar("thresholds") as bar:
            for i in range(len(self.model.layers)):
                with self.model.loaded(f"model.layers.{i}") as layer:
                    quantiles = _Quantiles(self.samples, tokens, generator)
                    done = [False] * len(chunks)
                    while not all(done):
                        for c, (hidden, calls) in enumerate(chunks):
                            if done[c]:
                                continue
                            handles = [_linear(layer, p).register_forward_pre_hook(
                                hook(quantiles, p.name, modules[p.name].sparsity, INPUT_OF[p.kind], c))
                                for p in self.by_layer.get(i, ()) if p.name in modules]
                            try:
                                with torch.no_grad():
                                    chunks[c] = (self.model.run(layer, hidden, calls[i]), calls)  # the input is freed
                                done[c] = True
                            except _Stop:
                                pass
                            finally:
                                for handle in handles:
                                    handle.remove()
                bar.update()
        return thresholds

    def greedy_rows(self, sites: str, step: float, up_to: float, s_min: float = 0.0,
                    s_max: float = 0.99) -> dict[int, list[GreedyRow]]:
        """Each block's teal-greedy rows (see :func:`acttail_export.greedy.search_block`), searched once per setting,
        from each block's dense input, output and attention call on the first ``greedy_windows`` windows.

        Rows do not depend on how far the search goes, so a search up to a higher ``up_to`` serves every lower one.
        """
        key = (sites, step, s_min, s_max)
        if key in self._rows and self._rows[key][0] >= up_to:
            return self._rows[key][1]
        calls = {}

        def keep_attention_call(i, layer):
            def hook(module, args, kwargs):
                calls[i] = _replay(module, args, kwargs)
            return [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)]

        rows = {}
        with self._bar("teal-greedy") as bar:
            for i, layer, hidden, out in self.model.forward(self.ids[:self.greedy_windows], keep_attention_call):
                if i in self.by_layer:
                    rows[i] = search_block(layer, self.by_layer[i], hidden, calls[i], out, SITES[sites], step, up_to,
                                           s_min, s_max)
                bar.update()
        self._rows[key] = (up_to, rows)
        return rows

    def curves(self) -> dict[str, np.ndarray]:
        """Per projection, the Fisher loss-increase curve C_p(j) over j = 0 ... d_in inputs TopK drops (see
        :mod:`acttail_export.fisher`), of the dense model on the first ``curve_windows`` windows, ``curve_pass`` of
        them a forward and a backward pass (the curves are sums over tokens, and the loss is summed, so passes add up;
        memoized).

        The backward pass goes one layer at a time: each layer is recomputed from its stored input with autograd and
        hands the gradient at its input to the layer before. (Reading the curves again around the sparse model of the
        first allocation and splitting anew made SmolLM2 at 50% worse: 32.25 -> 36.39, docs/RESULTS.md.)
        """
        if self._curves is None:
            self._curves = {}
            for start in range(0, self.curve_windows, self.curve_pass):
                end = min(start + self.curve_pass, self.curve_windows)
                for name, curve in self._pass_curves(self.ids[start:end], f"windows {start + 1}-{end}").items():
                    self._curves[name] = self._curves[name] + curve if name in self._curves else curve
        return self._curves

    def _pass_curves(self, ids: torch.Tensor, which: str) -> dict[str, np.ndarray]:
        """The curves of one forward and backward pass over ``ids``."""
        inputs = []
        with self._bar(f"calibrated: forward, {which}") as bar:
            for _, _, hidden, out in self.model.forward(ids):
                inputs.append(hidden)  # [B, T, d] per layer: what the backward pass recomputes each layer from
                bar.update()
        _, grad = self.model.loss_gradient(out, ids)
        del out
        curves = {}
        with self._bar(f"calibrated: backward, {which}") as bar:
            for i in reversed(range(len(inputs))):
                with self.model.loaded(f"model.layers.{i}") as layer:
                    seen, grads = {}, {}
                    handles = [h for p in self.by_layer[i] for h in _watch(_linear(layer, p), p.name, seen, grads)]
                    hidden = inputs.pop().requires_grad_()
                    try:
                        with torch.enable_grad():
                            self.model.run(layer, hidden, self.model.calls[i]).backward(grad)
                    finally:
                        for handle in handles:
                            handle.remove()
                    grad = hidden.grad
                    readers = defaultdict(list)  # q/k/v (gate/up) read one input: it is ranked once for them
                    for p in self.by_layer[i]:
                        readers[seen[p.name].data_ptr()].append(p)
                    with torch.no_grad():
                        for members in readers.values():
                            # the gradient at each member's input
                            us = [grads[p.name].flatten(0, -2) @ _linear(layer, p).weight for p in members]
                            for p, curve in zip(members, topk_curves(seen[members[0].name].flatten(0, -2), us)):
                                curves[p.name] = curve
                bar.update()
        return curves

    @property
    def info(self) -> dict:
        """What the calibration saw, for the config block and the card."""
        windows, seqlen = self.ids.shape
        return {"text": self.text, "windows": windows, "seqlen": seqlen}


class _Stop(Exception):
    """Raised by a threshold hook to end a chunk's forward at an input whose threshold the other chunks must wait for."""


class _Quantiles:
    """Quantiles of |x| at each input (``key``: q/k/v's, o's, gate/up's, down's) of one layer on the calibration
    batch, handed in chunk by chunk.

    Over more than ``samples`` entries a quantile is taken over a seeded random subset: indices drawn over the whole
    batch, in the order its inputs are first seen (forward order, layer after layer with one ``generator``), so chunked
    or not, the same entries are read.

    :param tokens: each chunk's tokens (windows x seqlen), in batch order
    """

    def __init__(self, samples: int, tokens: list[int], generator: torch.Generator):
        self.samples, self.tokens, self.generator = samples, tokens, generator
        self.starts = np.cumsum([0] + tokens[:-1])
        self.drawn: dict[str, torch.Tensor | None] = {}
        self.seen: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        self.sorted: dict[str, torch.Tensor] = {}

    def add(self, key: str, chunk: int, x: torch.Tensor) -> bool:
        """Hand in ``chunk``'s input at ``key`` (once; q/k/v, gate/up share one); whether every chunk's is in."""
        if key not in self.sorted and chunk not in self.seen[key]:
            width = x.shape[-1]
            if key not in self.drawn:
                total = sum(self.tokens) * width
                self.drawn[key] = (torch.randint(total, (self.samples,), generator=self.generator)
                                   if total > self.samples else None)
            flat = x.abs().flatten()
            if self.drawn[key] is not None:
                start = int(self.starts[chunk]) * width
                mine = self.drawn[key][(self.drawn[key] >= start) & (self.drawn[key] < start + flat.numel())]
                flat = flat[mine - start]
            self.seen[key][chunk] = flat
            if len(self.seen[key]) == len(self.tokens):
                self.sorted[key] = torch.cat([self.seen[key][c] for c in range(len(self.tokens))]).sort().values
                del self.seen[key]
        return key in self.sorted

    def at(self, key: str, level: float) -> float:
        """The ``level``-quantile at ``key`` (0 where it keeps every entry)."""
        values = self.sorted[key]
        rank = round(level * len(values))
        return float(values[rank - 1]) if rank > 0 else 0.0


def _linear(layer: torch.nn.Module, p) -> torch.nn.Module:
    return layer.get_submodule(PROJECTION_PATHS[p.kind])


def _watch(linear: torch.nn.Module, name: str, inputs: dict, grads: dict) -> list:
    """Hooks that keep a projection's input and, once backward reaches it, the loss gradient at its output."""
    def keep_input(module, args):
        inputs[name] = args[0].detach()

    def keep_grad(module, args, output):
        output.register_hook(lambda g: grads.__setitem__(name, g))

    return [linear.register_forward_pre_hook(keep_input), linear.register_forward_hook(keep_grad)]


def _replay(module: torch.nn.Module, args: tuple, kwargs: dict):
    """A call of ``module`` as the model made it, with its hidden-states argument replaced."""
    def call(hidden_states: torch.Tensor):
        if args:
            return module(hidden_states, *args[1:], **kwargs)
        return module(**{**kwargs, "hidden_states": hidden_states})
    return call
