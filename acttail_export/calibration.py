"""Calibration on text for TEAL's methods: the source model run on calibration windows.

The threshold mode takes t_p = the s_p-quantile of |x| at projection p's input (TEAL), calibrated in one forward in
which every earlier input is already thresholded; the teal-greedy search (greedy.py) starts from each decoder block's
dense input, output and attention arguments on the first windows.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .allocation import SITES, GreedyRow, ModuleSparsity
from .errors import ExportError
from .evaluate import calibration_windows
from .greedy import search_block
from .kernels.topk import threshold_sparsify
from .weights import SourceModel

__all__ = [
    "DEFAULT_WINDOWS",
    "DEFAULT_SEQLEN",
    "DEFAULT_GREEDY_WINDOWS",
    "SAMPLES_PER_INPUT",
    "calibration_ids",
    "Calibration",
]

# TEAL calibrated on 10 windows x 2048 tokens on a GPU; 8 x 512 keeps the forward at ~10 s for SmolLM2 on 2 CPU cores.
DEFAULT_WINDOWS = 8
DEFAULT_SEQLEN = 512
# The greedy search replays every block ~7 times per row: its cost is proportional to its tokens (see greedy.py).
DEFAULT_GREEDY_WINDOWS = 1
# |x| entries a threshold is the quantile of: from n samples the quantile's level has a standard error of about
# sqrt(s (1 - s) / n) = 0.001 (torch.quantile refuses more than 16 M elements; 8 x 512 tokens x 1536 inputs are 6 M).
SAMPLES_PER_INPUT = 1 << 18


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
    """The dense source model and calibration windows, for the threshold mode and the teal-greedy search.

    :param source: the model (its safetensors folder is loaded in float32 on CPU)
    :param ids: ``[windows, seqlen]`` calibration token ids (see :func:`calibration_ids`)
    :param text: what the ids were cut from, for the record
    :param greedy_windows: how many of the windows the greedy search replays
    :param samples: |x| entries per input a threshold is the quantile of
    """

    def __init__(self, source: SourceModel, ids: torch.Tensor, text: str = "token ids",
                 greedy_windows: int = DEFAULT_GREEDY_WINDOWS, samples: int = SAMPLES_PER_INPUT, progress: bool = True):
        from transformers import AutoModelForCausalLM

        self.source, self.ids, self.text, self.samples, self.progress = source, ids, text, samples, progress
        self.greedy_windows = min(greedy_windows, len(ids))
        try:
            self.model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise ExportError(f"could not load {source.folder} for calibration: {e}") from e
        self.layers = sorted({p.layer for p in source.projections})
        self.hidden: list[torch.Tensor] = []  # dense block inputs on the greedy windows, then the last block's output
        self.attention: list = []  # per block: its self_attn called on a given normed input with the model's arguments
        self._rows: dict[tuple, tuple[float, dict[int, list[GreedyRow]]]] = {}

    def _layer(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(f"model.layers.{layer}")

    @torch.inference_mode()
    def thresholds(self, modules: dict[str, ModuleSparsity]) -> dict[str, float]:
        """t_p = the s_p-quantile of |x| at p's input over the calibration tokens (0 keeps every input).

        One forward over all windows as one batch, in forward order: each input is thresholded as soon as its threshold
        is known (its quantile needs every calibration token), so later thresholds see the activations the sparse model
        produces. (Quantiles of the dense model's activations,
        as TEAL took them, left SmolLM2 at 0.528 measured sparsity on held-out text for a 0.5 target.)
        """
        thresholds: dict[str, float] = {}
        generator = torch.Generator().manual_seed(0)
        last = {"input": None, "sorted": None}  # q/k/v (gate/up) are called with one input object: sample it once

        def apply(name: str, sparsity: float):
            def hook(module, args):
                x = args[0]
                if last["input"] is not x:
                    flat = x.abs().flatten()
                    if flat.numel() > self.samples:
                        flat = flat[torch.randint(flat.numel(), (self.samples,), generator=generator)]
                    last.update(input=x, sorted=flat.sort().values)
                rank = round(sparsity * len(last["sorted"]))
                thresholds[name] = float(last["sorted"][rank - 1]) if rank > 0 else 0.0
                return (threshold_sparsify(x, thresholds[name]),)
            return hook

        hooks = [self.model.get_submodule(name).register_forward_pre_hook(apply(name, m.sparsity))
                 for name, m in modules.items()]
        try:
            self.model(input_ids=self.ids, use_cache=False, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        return thresholds

    @torch.inference_mode()
    def _capture_blocks(self) -> None:
        """Each block's dense input and self_attn call on the greedy windows, and the last block's output."""
        def keep_block_input(module, args, kwargs):
            self.hidden.append(args[0] if args else kwargs["hidden_states"])

        def keep_block_output(module, args, kwargs, output):
            self.hidden.append(output[0] if isinstance(output, tuple) else output)

        def keep_attention_call(module, args, kwargs):
            self.attention.append(_replay(module, args, kwargs))

        hooks = []
        for layer in self.layers:
            hooks.append(self._layer(layer).register_forward_pre_hook(keep_block_input, with_kwargs=True))
            hooks.append(self._layer(layer).self_attn.register_forward_pre_hook(keep_attention_call, with_kwargs=True))
        hooks.append(self._layer(self.layers[-1]).register_forward_hook(keep_block_output, with_kwargs=True))
        try:
            self.model(input_ids=self.ids[:self.greedy_windows], use_cache=False, logits_to_keep=1)
        finally:
            for hook in hooks:
                hook.remove()

    def greedy_rows(self, sites: str, step: float, up_to: float, s_min: float = 0.0,
                    s_max: float = 0.99) -> dict[int, list[GreedyRow]]:
        """Each block's teal-greedy rows (see :func:`acttail_export.greedy.search_block`), searched once per setting.

        Rows do not depend on how far the search goes, so a search up to a higher ``up_to`` serves every lower one.
        """
        key = (sites, step, s_min, s_max)
        if key in self._rows and self._rows[key][0] >= up_to:
            return self._rows[key][1]
        if not self.hidden:
            self._capture_blocks()
        by_layer = {layer: [p for p in self.source.projections if p.layer == layer] for layer in self.layers}
        rows = {}
        for i, layer in enumerate(tqdm(self.layers, desc="teal-greedy", unit="block", disable=None if self.progress else True)):
            rows[layer] = search_block(self._layer(layer), by_layer[layer], self.hidden[i], self.attention[i],
                                       self.hidden[i + 1], SITES[sites], step, up_to, s_min, s_max)
        self._rows[key] = (up_to, rows)
        return rows

    @property
    def info(self) -> dict:
        """What the calibration saw, for the config block and the card."""
        windows, seqlen = self.ids.shape
        return {"text": self.text, "windows": windows, "seqlen": seqlen}


def _replay(module: torch.nn.Module, args: tuple, kwargs: dict):
    """A call of ``module`` as the model made it, with its hidden-states argument replaced."""
    def call(hidden_states: torch.Tensor):
        if args:
            return module(hidden_states, *args[1:], **kwargs)
        return module(**{**kwargs, "hidden_states": hidden_states})
    return call
