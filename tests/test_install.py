"""The runtime imports in-process from the installed package, under its module names, editable or not."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
IMPORTS = """
import sys
import acttail_export
assert acttail_export.__file__.startswith(TARGET), acttail_export.__file__  # this install, not the editable one
from acttail_export.modeling.modeling_acttail import ActTailLlamaForCausalLM
from acttail_export.modeling.activation_sparsity import ActivationSparsity
from acttail_export.modeling.projections import INPUT_OF
import acttail_export.kernels.topk, acttail_export.kernels.topk_cpu, acttail_export.kernels.topk_triton
print("SAME", all(sys.modules[f"acttail_export.modeling.{name}"] is sys.modules[f"acttail_export.kernels.{name}"]
                  for name in ("topk", "topk_cpu")))
print("SPEC", acttail_export.kernels.topk.__spec__.name)
"""


def test_runtime_imports_from_a_plain_install(tmp_path):
    source = tmp_path / "src"  # a copy: building in the repository would leave build/ and egg-info there
    for name in ("acttail_export", "modeling", "kernels"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(target), str(source)], check=True, capture_output=True, stdin=subprocess.DEVNULL)
    assert not (target / "acttail_export" / "modeling" / "topk.py").exists()  # installed once, under kernels
    env = {**os.environ, "PYTHONPATH": str(target), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", IMPORTS.replace("TARGET", repr(str(target)))], capture_output=True, text=True,
                            env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SAME True" in result.stdout and "SPEC acttail_export.kernels.topk" in result.stdout


def test_runtime_imports_in_this_process():
    # the test environment's install (editable, from scripts/setup.sh)
    from acttail_export.kernels import topk, topk_cpu
    from acttail_export.modeling import modeling_acttail
    from acttail_export.modeling import topk as modeling_topk

    assert modeling_topk is topk and sys.modules["acttail_export.modeling.topk_cpu"] is topk_cpu
    assert modeling_acttail.topk_sparsify is topk.topk_sparsify
    assert topk.__spec__.name == "acttail_export.kernels.topk"
