"""Helpers for the vLLM plugin's tests (run under .venv-vllm, vLLM's CPU build): engines in their own processes,
teacher-forced reference log-probabilities from the transformers runtime, windows of real English text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acttail_export.kernels.topk import topk_mask

ENGINE_SCRIPT = Path(__file__).parent / "engine.py"
# The vLLM engine in its own process: no remote code anywhere, insecure serialization only to send apply_model's hooks.
VLLM_ENV = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
# Under pytest-xdist (scripts/test.sh runs two workers) each worker's engines bind their OpenMP threads to a core of its
# own: vLLM's default binds every engine to every core, and two engines' spinning threads on one core slow both.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    _cores = sorted(os.sched_getaffinity(0))
    VLLM_ENV["VLLM_CPU_OMP_THREADS_BIND"] = str(_cores[int(os.environ["PYTEST_XDIST_WORKER"][2:]) % len(_cores)])


def run_engine(request: dict, tmp_path: Path, env: dict | None = None, timeout: int = 600) -> dict:
    """Run tests/vllm/engine.py on ``request`` in a new process; return its report."""
    path = tmp_path / f"request-{len(list(tmp_path.glob('request-*')))}.json"
    path.write_text(json.dumps(request))
    result = subprocess.run([sys.executable, str(ENGINE_SCRIPT), str(path)], capture_output=True, text=True,
                            env={**os.environ, **VLLM_ENV, **(env or {})}, stdin=subprocess.DEVNULL, timeout=timeout)
    reports = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    if result.returncode != 0 or not reports:
        when = "after its report" if reports else "before its report"
        raise AssertionError(f"vLLM engine failed ({result.returncode}, {when}):\n{result.stderr[-5000:]}")
    return json.loads(reports[-1].removeprefix("REPORT "))


def text_windows(tokenizer_path: Path, text: str, count: int, length: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens of real text, from separate places in it."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_path)(text[:200_000])["input_ids"]
    step = len(ids) // count
    return [ids[i * step:i * step + length] for i in range(count)]


FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "gate_proj": ("gate_up_proj", 0),
         "up_proj": ("gate_up_proj", 1)}


def reference_logprobs(checkpoint: Path, windows: list[list[int]], capture: tuple[str, ...] = ()):
    """The transformers runtime's teacher-forced log-probabilities of each window's tokens (float32, the checkpoint's
    own code with ``trust_remote_code``), the inputs of the ``capture`` projections (all windows, in order), and every
    sparse projection's kept-set signatures (engine.kept_signature), keyed as vLLM's layers: ``{layer: [member]}``."""
    logprobs, _, inputs, signatures = _runtime_pass(checkpoint, windows, capture)
    return logprobs, inputs, signatures


def _runtime_pass(checkpoint: Path, windows: list[list[int]], capture: tuple[str, ...] = ()):
    """reference_logprobs' three results and, second, each window's greedy next token at every position."""
    from transformers import AutoModelForCausalLM

    from engine import kept_signature

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    inputs = {name: [] for name in capture}
    for name in capture:
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0][0]))
    signatures = {}
    for name, module in model.named_modules():
        if hasattr(module, "keep") and hasattr(module, "prefill"):  # the runtime's TopKLinear
            parent, _, child = name.rpartition(".")
            layer, member = FUSED.get(child, (child, 0))

            def hook(m, args, key=(f"{parent}.{layer}", member)):
                x = args[0][0]
                mask = topk_mask(x, m.keep) if m.threshold is None else x.abs() > m.threshold
                signatures.setdefault(key, []).extend(kept_signature(mask))
            module.register_forward_pre_hook(hook)
    logprobs, greedy = [], []
    with torch.inference_mode():
        for window in windows:
            ids = torch.tensor([window])
            scores = model(ids).logits[0].float().log_softmax(-1)
            logprobs.append(scores[:-1].gather(1, ids[0, 1:, None])[:, 0].tolist())
            greedy.append(scores.argmax(-1).tolist())
    by_layer = {}
    for (layer, member), signature in sorted(signatures.items()):
        by_layer.setdefault(layer, []).append(signature)
    return logprobs, greedy, {name: torch.cat(xs) for name, xs in inputs.items()}, by_layer


def served_sequences(report: dict) -> list[list[int]]:
    """Per prompt the engine answered, the tokens its forward passes read: the prompt, then every generated token but
    the last (no forward pass reads that one)."""
    return [ids + tokens[:-1] for ids, tokens in zip(report["prompt_tokens"], report["tokens"], strict=True)]


def served_signatures(report: dict, windows: list[list[int]]) -> dict:
    """The engine's kept-set signatures of its served sequences' rows (after the scored windows' rows)."""
    first_row = sum(len(w) for w in windows)
    return {layer: [member[first_row:] for member in members] for layer, members in report["signatures"].items()}


def assert_greedy_before_flips(report: dict, windows: list[list[int]], want_next: list[list[int]], want_signatures: dict,
                               min_decode_steps: int = 1):
    """The engine's greedy tokens are ``want_next`` (per served sequence, the greedy next token at each position) at
    every step before the sequence's first flipped kept set, and at least ``min_decode_steps`` decode steps (one-token
    forward passes: the sparse GEMV path) came before a flip. A flip of a near tie changes the logits by far more than
    rounding (one input at a threshold, times its weight row), so later tokens may part without an error.

    :param want_signatures: the kept-set signatures of the served sequences' rows (their first row first)
    """
    got = served_signatures(report, windows)
    sequences = served_sequences(report)
    decode_steps = 0
    for ids, tokens, want, flip in zip(report["prompt_tokens"], report["tokens"], want_next,
                                       first_flips(got, want_signatures, sequences), strict=True):
        compared = [j for j in range(len(tokens)) if len(ids) - 1 + j < flip]  # token j comes from position P-1+j
        assert [tokens[j] for j in compared] == [want[len(ids) - 1 + j] for j in compared], (tokens, flip)
        decode_steps += max(len(compared) - 1, 0)
    assert decode_steps >= min_decode_steps, f"only {decode_steps} decode steps before a flipped kept set"


def runtime_greedy(checkpoint: Path, report: dict) -> tuple[list[list[int]], dict]:
    """The transformers runtime's greedy next token at every position of the engine's served sequences, and the kept
    sets of their rows (for :func:`assert_greedy_before_flips`)."""
    _, greedy, _, signatures = _runtime_pass(checkpoint, served_sequences(report))
    return greedy, signatures


def first_flips(got: dict, want: dict, windows: list[list[int]]) -> list[int]:
    """Per window, the first token at which any sparse projection of the engine kept another set than the runtime
    (the window's length if none): rounding differences between two engines' kernels (attention, norms) can flip a
    near tie of the ranking, and the change then carries on to every later token."""
    assert got and set(got) <= set(want)  # vLLM's sparse layers (one whose members all keep every input stays dense)
    flips, start = [], 0
    for window in windows:
        end = start + len(window)
        flipped = [t for layer in got for g, w in zip(got[layer], want[layer], strict=True)
                   for t in range(start, end) if g[t] != w[t]]
        flips.append(min(flipped) - start if flipped else len(window))
        start = end
    return flips


def assert_logprobs_match(got: list[list[float]], want: list[list[float]], flips: list[int], atol: float = 1e-3,
                          min_share: float = 0.3):
    """Equal to ``atol`` at every position before the window's first flipped kept set (log-prob i scores token i + 1
    from tokens 0..i), and those positions are at least ``min_share`` of the windows. Where the first flip falls
    depends on the CPU's kernels: on SmolLM2 at 50%, 2 x 96 tokens, the first flips came at tokens 65 and later on an
    AMD EPYC and at tokens 35 and 6 on an Intel Xeon (2026-12-02); a semantic error flips at the first token."""
    compared = 0
    for g, w, flip in zip(got, want, flips, strict=True):
        assert len(g) == len(w)
        error = max((abs(a - b) for a, b in zip(g[:flip], w[:flip])), default=0.0)
        assert error < atol, f"log-prob differs by {error} before the first flipped kept set (token {flip})"
        compared += min(flip, len(g))
    total = sum(len(w) for w in want)
    assert compared >= min_share * total, f"only {compared} of {total} positions before a flipped kept set {flips}"


@pytest.fixture(scope="session")
def tokenizer_windows(smollm2, wiki_text):
    """Twelve windows of 16 Wikipedia tokens (SmolLM2's tokenizer): a flipped near tie spoils the rest of its window
    only, so short windows keep most positions comparable (see assert_logprobs_match)."""
    return text_windows(smollm2.folder, wiki_text, 12, 16)
