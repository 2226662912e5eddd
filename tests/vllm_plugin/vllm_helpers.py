"""Helpers for the vLLM plugin's tests (run under .venv-vllm, vLLM's CPU build): engines in their own processes,
teacher-forced reference log-probabilities from the transformers runtime, windows of real English text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENGINE_SCRIPT = Path(__file__).parent / "engine.py"
# The vLLM engine in its own process: no remote code anywhere, insecure serialization only to send apply_model's hooks.
VLLM_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


def run_engine(request: dict, tmp_path: Path, env: dict | None = None, timeout: int = 600) -> dict:
    """Run tests/vllm/engine.py on ``request`` in a new process; return its report."""
    path = tmp_path / f"request-{len(list(tmp_path.glob('request-*')))}.json"
    path.write_text(json.dumps(request))
    result = subprocess.run([sys.executable, str(ENGINE_SCRIPT), str(path)], capture_output=True, text=True,
                            env={**os.environ, **VLLM_ENV, **(env or {})}, stdin=subprocess.DEVNULL, timeout=timeout)
    reports = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    if result.returncode != 0 or not reports:
        raise AssertionError(f"vLLM engine failed ({result.returncode}):\n{result.stderr[-5000:]}")
    return json.loads(reports[-1].removeprefix("REPORT "))


def text_windows(tokenizer_path: Path, text: str, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of real text, from separate places in it."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_path)(text[:200_000])["input_ids"]
    step = len(ids) // count
    return [ids[i * step:i * step + length] for i in range(count)]


def reference_logprobs(checkpoint: Path, windows: list[list[int]], capture: tuple[str, ...] = ()) -> tuple[list, dict]:
    """The transformers runtime's teacher-forced log-probabilities of each window's tokens (float32, the checkpoint's
    own code with ``trust_remote_code``), and the inputs of the ``capture`` projections (all windows, in order)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    inputs = {name: [] for name in capture}
    for name in capture:
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0][0]))
    logprobs = []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window])
            scores = model(ids).logits[0, :-1].float().log_softmax(-1)
            logprobs.append(scores.gather(1, ids[0, 1:, None])[:, 0].tolist())
    return logprobs, {name: torch.cat(xs) for name, xs in inputs.items()}


def max_logprob_error(got: list[list[float]], want: list[list[float]]) -> float:
    assert [len(g) for g in got] == [len(w) for w in want]
    return max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))


@pytest.fixture(scope="session")
def tokenizer_windows(smollm2, wiki_text):
    """Two windows of 96 Wikipedia tokens (SmolLM2's tokenizer)."""
    return text_windows(smollm2.folder, wiki_text, 2, 96)
