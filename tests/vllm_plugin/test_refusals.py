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


def _serve(folder):
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", "0",
               "--dtype", "float32", "--gpu-memory-utilization", "0.1", "--skip-tokenizer-init"]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **VLLM_ENV}, timeout=300,
                          stdin=subprocess.DEVNULL)


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
