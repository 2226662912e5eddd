"""Configurations of ActTail checkpoints: the base architecture's config plus an ``activation_sparsity`` block.

Shipped flat inside every exported checkpoint. Each class has its own ``model_type`` so that loading a checkpoint without
``trust_remote_code=True`` fails loudly instead of silently giving a dense model.
"""

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from .activation_sparsity import ActivationSparsity, validate_sparse_backend
from .projections import SITES  # noqa: F401  (transformers 5.0 copies only the files a loaded file imports directly)

__all__ = [
    "ActTailLlamaConfig",
    "ActTailMistralConfig",
    "ActTailQwen2Config",
    "ActTailQwen3Config",
]

class ActTailConfigMixin:
    """``activation_sparsity``: the per-projection TopK block; ``sparse_backend``: how decode steps run (see
    activation_sparsity.SPARSE_BACKENDS; ``from_pretrained(..., sparse_backend="reference")`` forces the reference path)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.activation_sparsity is not None:
            ActivationSparsity.from_dict(self.activation_sparsity)  # the checks against the model come at load
        validate_sparse_backend(self.sparse_backend)


@strict
class ActTailLlamaConfig(ActTailConfigMixin, LlamaConfig):
    model_type = "acttail_llama"
    activation_sparsity: dict | None = None
    sparse_backend: str = "auto"


@strict
class ActTailMistralConfig(ActTailConfigMixin, MistralConfig):
    model_type = "acttail_mistral"
    activation_sparsity: dict | None = None
    sparse_backend: str = "auto"


@strict
class ActTailQwen2Config(ActTailConfigMixin, Qwen2Config):
    model_type = "acttail_qwen2"
    activation_sparsity: dict | None = None
    sparse_backend: str = "auto"


@strict
class ActTailQwen3Config(ActTailConfigMixin, Qwen3Config):
    model_type = "acttail_qwen3"
    activation_sparsity: dict | None = None
    sparse_backend: str = "auto"
