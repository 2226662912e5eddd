"""Architecture coverage and tensor parallel, on small random models (coverage, not quality): a Qwen2-style model with
biases under vLLM's default torch.compile, and a Llama model with SmolLM2's widths and 8/2 heads at tp=2 against tp=1,
with the ``prefill`` policy of a fraction."""

import shutil

import pytest
import torch

from conftest import make_tiny_model, run_cli
from vllm_helpers import (assert_greedy_before_flips, assert_logprobs_match, first_flips, reference_logprobs, run_engine,
                          served_signatures, text_windows)


@pytest.fixture(scope="module")
def qwen2_50(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2")
    make_tiny_model("qwen2", root / "dense", hidden_size=256, intermediate_size=512)  # head_dim 64: vLLM's CPU attention
    run_cli("export", root / "dense", root / "acttail-50", "--sparsity", "0.5", "--allocation", "acttail")
    return root / "acttail-50"


def test_qwen2_with_biases_compiled_equals_the_transformers_runtime(qwen2_50, tmp_path):
    """vLLM's default torch.compile (enforce_eager=False) around the sparse custom op; q/k/v carry biases. A compiled
    graph runs no forward hooks, so no kept sets are compared: on two layers no rounding flips one, and every position
    must match."""
    windows = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0)).tolist()
    report = run_engine({"model": str(qwen2_50), "windows": windows,
                         "engine": {"enforce_eager": False, "skip_tokenizer_init": True, "max_model_len": 128}},
                        tmp_path)
    want, _, _ = reference_logprobs(qwen2_50, windows)
    assert_logprobs_match(report["logprobs"], want, [len(w) for w in windows])


@pytest.fixture(scope="module")
def smollm2_shaped(smollm2, tmp_path_factory):
    """A random 4-layer Llama of SmolLM2's widths with 8 query / 2 key-value heads (SmolLM2's 9 do not split in two),
    exported at 50% with ``--prefill 0.5``, SmolLM2's tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp")
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "dense")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2.folder / name, root / "dense" / name)
    run_cli("export", root / "dense", root / "acttail-50", "--sparsity", "0.5", "--allocation", "acttail", "--prefill",
            "0.5")
    return root / "acttail-50"


def test_tensor_parallel_2_equals_1(smollm2_shaped, smollm2, wiki_text, tmp_path):
    """Row-parallel o/down rank the whole input (gathered), so tp=2 keeps tp=1's sets: the same log-probabilities
    and greedy tokens; and both equal the transformers runtime's, prompt halves dense as ``--prefill 0.5`` says."""
    windows = text_windows(smollm2.folder, wiki_text, 2, 64)
    request = {"model": str(smollm2_shaped), "windows": windows, "prompts": ["The history of the town"],
               "max_tokens": 8, "signatures": True}
    tp1 = run_engine(request, tmp_path)
    tp2 = run_engine({**request, "engine": {"tensor_parallel_size": 2}}, tmp_path,
                     env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    want, _, signatures = reference_logprobs(smollm2_shaped, windows)
    assert_logprobs_match(tp1["logprobs"], want, first_flips(tp1["signatures"], signatures, windows))
    assert_logprobs_match(tp2["logprobs"], tp1["logprobs"], first_flips(tp2["signatures"], tp1["signatures"], windows))
    # greedy: tp=2's tokens are tp=1's up to the first kept set that differs between them (a near tie)
    tp1_next = [[-1] * (len(ids) - 1) + tokens for ids, tokens in zip(tp1["prompt_tokens"], tp1["tokens"])]
    assert_greedy_before_flips(tp2, windows, tp1_next, served_signatures(tp1, windows))
