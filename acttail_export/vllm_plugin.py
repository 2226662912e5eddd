"""vLLM plugin: serve exported checkpoints on vLLM's own Llama, Mistral, Qwen2 and Qwen3 models, sparse.

vLLM runs :func:`register` in each of its processes (entry point ``vllm.general_plugins`` in pyproject.toml). It
registers the checkpoints' config classes with transformers (so vLLM reads config.json without ``trust_remote_code``;
the checkpoint's own .py files never run) and their architectures with vLLM's ModelRegistry, as subclasses of vLLM's
classes that hand each sparse projection to ``vllm_sparse.SparseLinearMethod``. A checkpoint without a block (dense) is
served as the base model. A block that does not fit the model stops vLLM with one line and exit status 1.
"""

from .modeling import configuration_acttail
from .modeling.activation_sparsity import ActivationSparsity, environment_backend

__all__ = ["register", "ARCHITECTURES", "read_block", "checked_environment_backend"]

# exported architecture -> (vLLM module, vLLM class it is served on); config classes in modeling/configuration_acttail.py
ARCHITECTURES = {
    "ActTailLlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "ActTailMistralForCausalLM": ("mistral", "MistralForCausalLM"),
    "ActTailQwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "ActTailQwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def _stop(problem: str):
    """Stop the process with one line on stderr and exit status 1 (vLLM prints no traceback for SystemExit)."""
    return SystemExit(f"acttail-export: {problem}")


def read_block(config) -> ActivationSparsity | None:
    """The checkpoint's ``activation_sparsity`` block, checked (as the transformers runtime checks it) against the
    model's projection shapes; None for a dense checkpoint. SystemExit with one line on a block that does not fit."""
    from .vllm_sparse import projection_shapes

    block = getattr(config, "activation_sparsity", None)
    if block is None:
        return None
    try:
        sparsity = ActivationSparsity.from_dict(block)
        sparsity.check_model(projection_shapes(config))
    except ValueError as error:
        raise _stop(str(error)) from None
    return sparsity


def checked_environment_backend() -> str:
    """ACTTAIL_SPARSE_BACKEND ("auto" if unset); SystemExit with one line on a value that names no backend."""
    try:
        return environment_backend()
    except ValueError as error:
        raise _stop(str(error)) from None


def _checked_config(cls):
    """``cls`` whose checks of the block stop the process with one line (transformers would raise a ValueError, and
    vLLM would print it with a page of traceback)."""

    class Checked(cls):
        def __post_init__(self, **kwargs):
            try:
                super().__post_init__(**kwargs)
            except ValueError as error:
                raise _stop(str(error)) from None
            unknown = [arch for arch in self.architectures or () if arch not in ARCHITECTURES]
            if unknown:
                raise _stop(f"architecture {unknown[0]!r} is not one the vLLM plugin serves ({', '.join(ARCHITECTURES)})")

    Checked.__name__ = Checked.__qualname__ = cls.__name__
    Checked.__module__ = __name__
    return Checked


# at this module's top level, under the same names: vLLM pickles the config for its engine process, which unpickles it
# before it loads plugins
ActTailLlamaConfig = _checked_config(configuration_acttail.ActTailLlamaConfig)
ActTailMistralConfig = _checked_config(configuration_acttail.ActTailMistralConfig)
ActTailQwen2Config = _checked_config(configuration_acttail.ActTailQwen2Config)
ActTailQwen3Config = _checked_config(configuration_acttail.ActTailQwen3Config)
CONFIGS = (ActTailLlamaConfig, ActTailMistralConfig, ActTailQwen2Config, ActTailQwen3Config)


def _config_check():
    """The hook vLLM calls on its config in the main process (``MODELS_CONFIG_MAP``): check the block and
    ACTTAIL_SPARSE_BACKEND before any worker starts. A ``prefill`` policy other than "sparse" needs each prompt in one
    step, whole: prefix caching goes off (a cached prompt token would carry the sparsity of the request that computed
    it), and so does chunked prefill (a chunk would be taken for the whole prompt, or its last token for a decode
    step); a step then holds at least one prompt of the longest length, as vLLM sets it up for MLA on CPU."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    class ActTailConfigCheck(VerifyAndUpdateConfig):
        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            sparsity = read_block(vllm_config.model_config.hf_config)
            if sparsity is None:
                return
            checked_environment_backend()
            if sparsity.prefill != "sparse":
                vllm_config.cache_config.enable_prefix_caching = False
                scheduler = vllm_config.scheduler_config
                scheduler.enable_chunked_prefill = False
                scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens,
                                                       vllm_config.model_config.max_model_len)

    return ActTailConfigCheck


def register() -> None:
    """Register the config classes with transformers and the architectures with vLLM (idempotent: vLLM may load
    plugins more than once per process)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for cls in CONFIGS:
        AutoConfig.register(cls.model_type, cls, exist_ok=True)
    check = _config_check()
    for arch in ARCHITECTURES:
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"acttail_export.vllm_models:{arch}")
        MODELS_CONFIG_MAP.setdefault(arch, check)
