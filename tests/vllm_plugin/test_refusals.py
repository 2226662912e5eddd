"""What vLLM's server does with a checkpoint the plugin cannot serve: one line naming the problem, a non-zero exit,
no traceback, before any engine starts."""

import json
import os
import subprocess
import sys

import pytest

from conftest import make_tiny_model, run_cli
from vllm_helpers import VLLM_ENV


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("refusals")
    make_tiny_model("llama", root / "dense")
    run_cli("export", root / "dense", root / "acttail-50", "--sparsity", "0.5", "--allocation", "acttail")
    return root / "acttail-50"


def _variant(export, tmp_path, edit):
    """A copy of the export's folder (weights linked) whose config.json ``edit`` changed."""
    folder = tmp_path / "variant"
    folder.mkdir()
    for item in export.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config.json").unlink()
    config = json.loads((export / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _serve(folder, env: dict | None = None):
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", "0",
               "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--skip-tokenizer-init"]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **VLLM_ENV, **(env or {})},
                          timeout=300, stdin=subprocess.DEVNULL)


def _keep_too_many(config):
    config["activation_sparsity"]["modules"]["model.layers.0.mlp.up_proj"]["keep"] = 65


def _module_missing(config):
    del config["activation_sparsity"]["modules"]["model.layers.1.self_attn.o_proj"]


def _unknown_architecture(config):
    config["architectures"] = ["ActTailGemmaForCausalLM"]


@pytest.mark.parametrize("edit, problem", [
    (_keep_too_many, "acttail-export: activation_sparsity.modules['model.layers.0.mlp.up_proj'].keep: keep=65"),
    (_module_missing, "acttail-export: activation_sparsity.modules lists 13 of the model's 14 projections; missing "
                      "'model.layers.1.self_attn.o_proj'"),
    (_unknown_architecture, "acttail-export: architecture 'ActTailGemmaForCausalLM'"),
])
def test_refused_with_one_line(tiny_export, tmp_path, edit, problem):
    result = _serve(_variant(tiny_export, tmp_path, edit))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(problem), result.stderr[-3000:]


def test_a_backend_variable_that_names_no_backend_is_refused_with_one_line(tiny_export):
    result = _serve(tiny_export, {"ACTTAIL_SPARSE_BACKEND": "CPU"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "acttail-export: the environment variable ACTTAIL_SPARSE_BACKEND must be one of ('auto', 'triton', 'cpu', "
        "'reference'), got 'CPU'"), result.stderr[-3000:]


def test_a_prompt_policy_keeps_each_prompt_whole_in_one_step(tiny_export, tmp_path):
    """A ``prefill`` policy other than "sparse" counts a prompt's tokens from its end: vLLM must not split a prompt over
    steps (chunked prefill, vLLM's default) nor take part of it from the prefix cache. "sparse" changes nothing."""
    from vllm.engine.arg_utils import EngineArgs

    def config(folder):
        return EngineArgs(model=str(folder), dtype="float32", skip_tokenizer_init=True,
                          gpu_memory_utilization=0.1).create_engine_config()

    (tmp_path / "half").mkdir()
    half = config(_variant(tiny_export, tmp_path / "half", lambda c: c["activation_sparsity"].update(prefill=0.5)))
    assert not half.scheduler_config.enable_chunked_prefill and not half.cache_config.enable_prefix_caching
    assert half.scheduler_config.max_num_batched_tokens >= half.model_config.max_model_len
    sparse = config(tiny_export)
    assert sparse.scheduler_config.enable_chunked_prefill and sparse.cache_config.enable_prefix_caching
