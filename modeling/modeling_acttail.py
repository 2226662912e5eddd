"""ActTail causal LMs: the installed transformers architecture with TopK activation sparsity at its seven projections.

Shipped flat inside every exported checkpoint (load with ``trust_remote_code=True``). Each class subclasses the installed
``*ForCausalLM`` and swaps the q/k/v/o/gate/up/down ``nn.Linear`` modules named in ``config.activation_sparsity["modules"]``
for :class:`TopKLinear`, which keeps the same parameters, so state-dict keys and weights are those of the base model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .activation_sparsity import validate_activation_sparsity
from .configuration_acttail import ActTailLlamaConfig, ActTailMistralConfig, ActTailQwen2Config, ActTailQwen3Config
from .topk import topk_sparsify

__all__ = [
    "TopKLinear",
    "ActTailLlamaForCausalLM",
    "ActTailMistralForCausalLM",
    "ActTailQwen2ForCausalLM",
    "ActTailQwen3ForCausalLM",
]


class TopKLinear(nn.Linear):
    """``nn.Linear`` whose input keeps only its ``keep`` largest-magnitude entries per token.

    ``prefill`` decides which tokens of a multi-token call (a prompt, or a perplexity window) are sparsified:
    "sparse" all of them, "dense" none, a fraction f the last ceil(f * S). Single-token calls (decode steps) are always sparse.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, prefill="sparse", device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.keep = keep
        self.prefill = prefill

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep: int, prefill) -> "TopKLinear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, keep, prefill, device="meta")
        module.weight, module.bias = linear.weight, linear.bias  # share, never copy
        return module

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., S, d_in]
        if x.dim() < 2 or x.shape[-2] == 1 or self.prefill == "sparse":
            return topk_sparsify(x, self.keep)
        if self.prefill == "dense":
            return x
        tokens = x.shape[-2]
        sparse_tokens = math.ceil(self.prefill * tokens)
        head, tail = x.split([tokens - sparse_tokens, sparse_tokens], dim=-2)
        return torch.cat([head, topk_sparsify(tail, self.keep)], dim=-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.sparsify(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}, prefill={self.prefill!r}"


class ActTailMixin:
    """Applies ``config.activation_sparsity`` after the base model is built; ``set_activation_sparsity`` re-applies one."""

    def __init__(self, config):
        super().__init__(config)
        if config.activation_sparsity is not None:
            self.set_activation_sparsity(config.activation_sparsity)

    def set_activation_sparsity(self, block: dict) -> None:
        """Swap or update the TopK projections named in ``block["modules"]`` (keep = in_features makes one dense).

        :param block: an ``activation_sparsity`` block, as in config.json
        """
        validate_activation_sparsity(block)
        prefill = block.get("prefill", "sparse")
        for name, spec in block["modules"].items():
            try:
                module = self.get_submodule(name)
            except AttributeError:
                raise ValueError(f"activation_sparsity names {name!r}, which this model does not have") from None
            if not isinstance(module, nn.Linear) or module.in_features != spec["in_features"]:
                raise ValueError(f"{name!r} is not a Linear with in_features={spec['in_features']}: {module}")
            if isinstance(module, TopKLinear):
                module.keep, module.prefill = spec["keep"], prefill
            else:
                parent, _, child = name.rpartition(".")
                setattr(self.get_submodule(parent), child, TopKLinear.from_linear(module, spec["keep"], prefill))
        self.config.activation_sparsity = block


class ActTailLlamaForCausalLM(ActTailMixin, LlamaForCausalLM):
    config_class = ActTailLlamaConfig


class ActTailMistralForCausalLM(ActTailMixin, MistralForCausalLM):
    config_class = ActTailMistralConfig


class ActTailQwen2ForCausalLM(ActTailMixin, Qwen2ForCausalLM):
    config_class = ActTailQwen2Config


class ActTailQwen3ForCausalLM(ActTailMixin, Qwen3ForCausalLM):
    config_class = ActTailQwen3Config
