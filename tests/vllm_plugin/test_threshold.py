"""SmolLM2-135M exported in threshold mode (calibrated per projection, TEAL) at 50%, served by vLLM: the transformers
runtime's teacher-forced log-probabilities and kept sets, and decode steps through the CPU sparse GEMV give the
runtime's greedy tokens."""

import json

import pytest
import torch

from conftest import run_cli
from vllm_helpers import assert_logprobs_match, first_flips, reference_logprobs, run_engine, tokenizer_windows  # noqa: F401

DOWN = "model.layers.12.mlp.down_proj"


@pytest.fixture(scope="module")
def threshold_50(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm-threshold") / "smollm2-teal-50"
    run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail", "--mode", "threshold")
    return out


def test_threshold_mode_equals_the_transformers_runtime(threshold_50, tokenizer_windows, tmp_path):
    prompt = "The river flows through the old town and"
    report = run_engine({"model": str(threshold_50), "windows": tokenizer_windows, "capture": [DOWN],
                         "prompts": [prompt], "max_tokens": 12, "signatures": True}, tmp_path)
    want, hf_inputs, signatures = reference_logprobs(threshold_50, tokenizer_windows, (DOWN,))
    flips = first_flips(report["signatures"], signatures, tokenizer_windows)
    # every entry within rounding of its projection's threshold may flip: with ~10^5 entries a token, flips come
    # earlier than in TopK mode (measured: tokens 9 and 32 of 96); the positions before them must still match
    assert_logprobs_match(report["logprobs"], want, flips, min_share=0.2)
    starts = [sum(len(w) for w in tokenizer_windows[:i]) for i in range(len(tokenizer_windows))]
    rows = torch.cat([torch.arange(start, start + flip) for start, flip in zip(starts, flips)])
    threshold = json.loads((threshold_50 / "config.json").read_text())["activation_sparsity"]["modules"][DOWN]["threshold"]
    x = torch.tensor(report["captured"][DOWN][0])
    kept = x.abs() > threshold
    assert torch.equal(kept[rows], (hf_inputs[DOWN].abs() > threshold)[rows])
    assert 0.2 < kept.float().mean() < 0.8  # the threshold drops a real share of the inputs

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(threshold_50)
    model = AutoModelForCausalLM.from_pretrained(threshold_50, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert report["tokens"][0] == tokens
