"""The model classes the vLLM plugin registers: vLLM's own classes with each sparse projection's linear method swapped.

Imported by vLLM (lazily, by name) when it serves an exported checkpoint; see ``vllm_plugin.py``.
"""

from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from .vllm_plugin import checked_environment_backend, read_block
from .vllm_sparse import apply_activation_sparsity, mark_step

__all__ = ["ActTailLlamaForCausalLM", "ActTailMistralForCausalLM", "ActTailQwen2ForCausalLM", "ActTailQwen3ForCausalLM"]


class ActTailMixin:
    """Builds the base model, then gives its sparse projections ``SparseLinearMethod`` (before vLLM loads the weights),
    and marks each step's prompt tokens for the block's ``prefill`` policy."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = vllm_config.model_config.hf_config
        sparsity = read_block(config)
        self.acttail_prefill = "sparse"
        if sparsity is not None:
            # as the transformers runtime: "auto" reads ACTTAIL_SPARSE_BACKEND; "reference" is the masked path only
            backend = getattr(config, "sparse_backend", "auto")
            if backend == "auto":
                backend = checked_environment_backend()
            apply_activation_sparsity(self, sparsity, backend)
            self.acttail_prefill = sparsity.prefill

    def forward(self, input_ids, positions, *args, **kwargs):
        mark_step(self.acttail_prefill, positions)  # outside the compiled graph: vLLM compiles the inner model
        return super().forward(input_ids, positions, *args, **kwargs)


class ActTailLlamaForCausalLM(ActTailMixin, LlamaForCausalLM):
    pass


class ActTailMistralForCausalLM(ActTailMixin, MistralForCausalLM):
    pass


class ActTailQwen2ForCausalLM(ActTailMixin, Qwen2ForCausalLM):
    pass


class ActTailQwen3ForCausalLM(ActTailMixin, Qwen3ForCausalLM):
    pass
