"""The source model run on calibration windows one decoder layer at a time (the sequential scheme of GPTQ / SparseGPT).

The model is built on the meta device (no memory); a layer's parameters are read from the safetensors files, one tensor
at a time, just before it runs and dropped right after, and the windows' hidden states are kept between layers. Peak
memory is one layer (in float32) plus the activations, instead of the whole model: a 7B model calibrates in a few GB.

Each layer is called with the arguments the model's own forward passes it (attention mask, rotary embeddings), recorded
once by running that forward with every layer replaced by a recorder, so a layer-by-layer pass computes what the
whole-model pass computes, operation for operation.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import ExportError
from .weights import SourceModel

__all__ = ["LayerwiseModel"]


def _fix_mmap_threshold() -> None:
    """Make glibc serve every allocation of 16 MiB and more (a 7B layer's hidden states) from its own mapping,
    returned to the system when freed.

    glibc raises its mmap threshold to the largest block freed (up to 32 MiB): after the first 16 MiB hidden state of a
    7B layer is freed, the next ones come from the heap, whose freed gaps smaller allocations then split, and the heap
    grew by ~100 MB a layer (a calibrated 8-layer 7B-shaped export peaked at 2.82 GiB, 2.11 GiB with the threshold
    fixed at 16 MiB; at 1 MiB 2.00 GiB, but SmolLM2's export, whose activations are a few MiB, ran 40% slower;
    BENCHMARKS.md). No-op where the C library has no ``mallopt``."""
    try:
        ctypes.CDLL(None).mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD; setting it also stops glibc's raising it
    except (OSError, AttributeError):
        pass


class _Stop(Exception):
    """Raised by the last recorder: the model's forward has handed every layer its arguments."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the call and passes the hidden state on unchanged."""

    def __init__(self, layer: nn.Module, calls: list, last: bool):
        super().__init__()
        self.attention_type = getattr(layer, "attention_type", None)  # read by models with per-layer masks
        self.calls, self.last = calls, last

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


class LayerwiseModel:
    """A causal LM whose parameters are read from disk one submodule at a time.

    :param source: the model (its safetensors files are read in float32 on CPU)
    """

    def __init__(self, source: SourceModel):
        from transformers import AutoConfig, AutoModelForCausalLM

        _fix_mmap_threshold()

        self.source = source
        settings = {k: v for k, v in source.config.items() if k != "model_type"}
        try:
            config = AutoConfig.for_model(source.model_type, **settings)
            with torch.device("meta"):
                # float32 whatever the config's dtype: the weights are read as float32 (as the whole-model path loads them)
                self.model = AutoModelForCausalLM.from_config(config).float().eval()
            # the backward pass wants the gradient at each layer's input only: weight gradients would double a layer
            self.model.requires_grad_(False)
        except Exception as e:  # transformers' config checks raise several types
            raise ExportError(f"could not build {source.folder} for calibration: {type(e).__name__}: {e}") from e
        self.config = config
        self.layers = self.model.model.layers
        self.calls: list[tuple[tuple, dict]] = []  # the last forward's per-layer arguments (see embed)
        self._files = {}
        for file in source.weight_files:
            try:
                with safe_open(file, framework="pt") as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
            except (SafetensorError, OSError) as e:
                raise ExportError(f"{file} is not a readable safetensors file: {e}") from e

    def _tensor(self, name: str) -> torch.Tensor:
        if name not in self._files:
            raise ExportError(f"{self.source.folder} lacks the tensor {name}")
        # one short-lived map per tensor, as weights.iter_projection_weights reads them (pages stay resident otherwise)
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name).float()

    @contextlib.contextmanager
    def loaded(self, prefix: str) -> Iterator[nn.Module]:
        """The submodule ``prefix`` (e.g. ``model.layers.3``) with its parameters read from disk, back on the meta
        device (freed) when the block ends."""
        module = self.model.get_submodule(prefix)
        module.to_empty(device="cpu")
        try:
            with torch.no_grad():
                for name, parameter in module.named_parameters():
                    parameter.copy_(self._tensor(f"{prefix}.{name}"))
            yield module
        finally:
            module.to("meta")

    def _head_weight(self) -> torch.Tensor:
        tied = getattr(self.config, "tie_word_embeddings", False) and "lm_head.weight" not in self._files
        return self._tensor("model.embed_tokens.weight" if tied else "lm_head.weight")

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """The first layer's input for ``ids`` (``[B, T]``) and, per layer, the other arguments the model passes it."""
        calls: list[tuple[tuple, dict]] = []
        inner = self.model.model
        original = inner.layers
        rotary = getattr(inner, "rotary_emb", None)
        inner.layers = nn.ModuleList(_Recorder(layer, calls, i == len(original) - 1) for i, layer in enumerate(original))
        if rotary is not None:  # its inv_freq buffer is computed at construction: build it again off the meta device
            inner.rotary_emb = type(rotary)(config=self.config)
        try:
            with self.loaded("model.embed_tokens"):
                try:
                    inner(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
        finally:
            inner.layers = original
            if rotary is not None:
                inner.rotary_emb = rotary
        if len(calls) != len(original):
            raise ExportError(f"{type(inner).__name__} called {len(calls)} of its {len(original)} layers")
        return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]

    @staticmethod
    def run(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
        """``layer`` on ``hidden`` with the arguments the model passes it."""
        args, kwargs = call
        out = layer(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def forward(self, ids: torch.Tensor, hooks=None) -> Iterator[tuple[int, nn.Module, torch.Tensor, torch.Tensor]]:
        """Run ``ids`` through the layers one at a time; yield ``(i, layer, input, output)`` while layer i is loaded.

        :param hooks: called as ``hooks(i, layer)`` before layer i runs; returns handles removed after it ran
        """
        hidden, self.calls = self.embed(ids)
        for i in range(len(self.layers)):
            with self.loaded(f"model.layers.{i}") as layer:
                handles = hooks(i, layer) if hooks else []
                try:
                    with torch.no_grad():
                        out = self.run(layer, hidden, self.calls[i])
                finally:
                    for handle in handles:
                        handle.remove()
                yield i, layer, hidden, out
            hidden = out

    def loss_gradient(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Summed next-token loss of the last layer's output ``hidden`` ``[B, T, d]`` and its gradient there."""
        hidden = hidden.detach().requires_grad_()
        weight = self._head_weight()
        total = 0.0
        with self.loaded("model.norm") as norm:
            for b in range(len(ids)):  # one window at a time: the logits of all windows at once are large
                logits = F.linear(norm(hidden[b]), weight)
                loss = F.cross_entropy(logits[:-1], ids[b, 1:], reduction="sum")
                loss.backward()
                total += float(loss.detach())
        return total, hidden.grad
