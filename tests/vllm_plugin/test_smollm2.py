"""SmolLM2-135M exported at 50% (TopK), served by vLLM through the plugin: the same teacher-forced log-probabilities and
kept sets as the transformers runtime, and the OpenAI-compatible server answering with the offline engine's text."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from acttail_export.kernels.topk import topk_mask

from conftest import run_cli
from vllm_helpers import VLLM_ENV, assert_logprobs_match, first_flips, reference_logprobs, run_engine, tokenizer_windows  # noqa: F401

PROMPTS = ["The river flows through the old town and", "In 1905 the physicist published"]
CHATS = [[{"role": "user", "content": "Name three colours of the rainbow."}]]
LAYER = "model.layers.7"
CAPTURE = (f"{LAYER}.self_attn.qkv_proj", f"{LAYER}.mlp.down_proj")


@pytest.fixture(scope="module")
def export_50(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm") / "smollm2-acttail-50"
    run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail")
    return out


@pytest.fixture(scope="module")
def served(export_50, tokenizer_windows, tmp_path_factory):
    """One engine for the module: the windows scored with capture, then the prompts and chats answered greedily."""
    return run_engine({"model": str(export_50), "windows": tokenizer_windows, "capture": list(CAPTURE),
                       "prompts": PROMPTS, "chats": CHATS, "max_tokens": 12, "signatures": True},
                      tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def reference(export_50, tokenizer_windows):
    return reference_logprobs(export_50, tokenizer_windows, ("model.layers.7.self_attn.q_proj",
                                                             "model.layers.7.mlp.down_proj"))


def test_prompt_logprobs_equal_the_transformers_runtime(tokenizer_windows, served, reference):
    want, _, signatures = reference
    assert_logprobs_match(served["logprobs"], want, first_flips(served["signatures"], signatures, tokenizer_windows))


def test_kept_sets_and_outputs_are_the_runtimes(export_50, tokenizer_windows, served, reference):
    """The captured projections keep the transformers runtime's sets, and compute F.linear of the kept inputs."""
    block = json.loads((export_50 / "config.json").read_text())["activation_sparsity"]["modules"]
    weights = load_file(export_50 / "model.safetensors")
    _, hf_inputs, signatures = reference
    # the tokens before each window's first flipped kept set (at any layer), as rows of the flattened batch
    flips = first_flips(served["signatures"], signatures, tokenizer_windows)
    starts = [sum(len(w) for w in tokenizer_windows[:i]) for i in range(len(tokenizer_windows))]
    rows = torch.cat([torch.arange(start, start + flip) for start, flip in zip(starts, flips)])
    for fused, members in ((CAPTURE[0], ("q_proj", "k_proj", "v_proj")), (CAPTURE[1], ("down_proj",))):
        x, y = (torch.tensor(t) for t in served["captured"][fused])
        hf_x = hf_inputs[f"{fused.rpartition('.')[0]}.{members[0]}"]
        assert x.shape == hf_x.shape  # every token of both windows, flattened by vLLM
        outputs = []
        for member in members:
            name = f"{fused.rpartition('.')[0]}.{member}"
            keep = block[name]["keep"]
            mask = topk_mask(x, keep)
            assert torch.equal(mask[rows], topk_mask(hf_x, keep)[rows]), name  # the same kept set for those tokens
            assert keep < x.shape[1] and (mask.sum(-1) == keep).all()
            outputs.append(F.linear(torch.where(mask, x, 0), weights[f"{name}.weight"]))
        want = torch.cat(outputs, dim=-1)
        assert torch.allclose(y, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_server_answers_with_the_offline_engines_text(export_50, served, tmp_path):
    """``python -m vllm.entrypoints.openai.api_server --model OUT``, no flag about remote code, on loopback."""
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export_50), "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
               "--gpu-memory-utilization", "0.1", "--max-model-len", "512", "--max-num-batched-tokens", "1024"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV},
                              stdin=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 400
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(2)
        for prompt, text in zip(PROMPTS, served["texts"]):
            answer = _post(f"{base}/v1/completions", {"model": str(export_50), "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0})
            assert answer["choices"][0]["text"] == text
        answer = _post(f"{base}/v1/chat/completions", {"model": str(export_50), "messages": CHATS[0],
                                                       "max_tokens": 12, "temperature": 0})
        assert answer["choices"][0]["message"]["content"] == served["chat_texts"][0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    assert server.returncode is not None
