"""Configurations of ActTail checkpoints: the base architecture's config plus an ``activation_sparsity`` block.

Shipped flat inside every exported checkpoint. Each class has its own ``model_type`` so that loading a checkpoint without
``trust_remote_code=True`` fails loudly instead of silently giving a dense model.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

__all__ = [
    "ActTailLlamaConfig",
    "ActTailMistralConfig",
    "ActTailQwen2Config",
    "ActTailQwen3Config",
    "validate_activation_sparsity",
]

FORMAT_VERSION = 1
PREFILL_MODES = ("sparse", "dense")


def validate_prefill(prefill) -> None:
    """``prefill`` is "sparse" (every token), "dense" (decode steps only) or a fraction f in (0, 1]: the last f of a prompt."""
    if prefill in PREFILL_MODES:
        return
    if isinstance(prefill, bool) or not isinstance(prefill, (int, float)) or not 0 < prefill <= 1:
        raise ValueError(f"activation_sparsity.prefill must be one of {PREFILL_MODES} or a fraction in (0, 1], got {prefill!r}")


def validate_activation_sparsity(block: dict) -> None:
    """Check an ``activation_sparsity`` block; raise ValueError naming the first bad field."""
    if block.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"activation_sparsity.format_version is {block.get('format_version')!r}; this code reads version {FORMAT_VERSION}"
        )
    validate_prefill(block.get("prefill", "sparse"))
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("activation_sparsity.modules must map module names to {keep, in_features, ...}")
    for name, spec in modules.items():
        keep, in_features = spec.get("keep"), spec.get("in_features")
        if not isinstance(in_features, int) or not isinstance(keep, int) or not 1 <= keep <= in_features:
            raise ValueError(f"activation_sparsity.modules[{name!r}]: keep={keep!r} must be an int in [1, in_features={in_features!r}]")


class ActTailConfigMixin:
    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.activation_sparsity is not None:
            validate_activation_sparsity(self.activation_sparsity)


@strict
class ActTailLlamaConfig(ActTailConfigMixin, LlamaConfig):
    model_type = "acttail_llama"
    activation_sparsity: dict | None = None


@strict
class ActTailMistralConfig(ActTailConfigMixin, MistralConfig):
    model_type = "acttail_mistral"
    activation_sparsity: dict | None = None


@strict
class ActTailQwen2Config(ActTailConfigMixin, Qwen2Config):
    model_type = "acttail_qwen2"
    activation_sparsity: dict | None = None


@strict
class ActTailQwen3Config(ActTailConfigMixin, Qwen3Config):
    model_type = "acttail_qwen3"
    activation_sparsity: dict | None = None
