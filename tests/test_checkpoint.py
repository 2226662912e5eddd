import dataclasses
import re

import pytest
from transformers.dynamic_module_utils import get_imports

from acttail_export.checkpoint import shipped_code_files, write_checkpoint
from acttail_export.weights import resolve_model


def test_shipped_code_is_flat_and_self_contained():
    files = shipped_code_files()
    assert [f.name for f in files] == ["activation_sparsity.py", "configuration_acttail.py", "modeling_acttail.py",
                                       "projections.py", "topk.py", "topk_cpu.py", "topk_triton.py"]
    names = {f.stem for f in files}
    for f in files:
        text = f.read_text()
        assert "acttail_export" not in text
        # Local imports must read exactly `from .name import X` with name a shipped file (remote code is flat).
        for module in re.findall(r"^\s*from \.(\w+) import", text, flags=re.M):
            assert module in names, (f.name, module)
        # What transformers requires installed (imports outside try blocks): the standard library and what it needs
        # itself; triton and numba are optional.
        assert set(get_imports(f)) <= {"dataclasses", "fractions", "functools", "hashlib", "itertools", "math",
                                       "operator", "os", "platform", "re", "sys", "threading", "typing", "torch",
                                       "transformers", "huggingface_hub"}, f.name
        assert not re.search(r"^from \.\.", text, flags=re.M)


def test_files_transformers_loads_import_every_helper_directly():
    # transformers 5.0 copies a local checkpoint's loaded file and only the files it imports directly (not theirs)
    files = {f.stem: f for f in shipped_code_files()}
    direct = {stem: set(re.findall(r"^\s*from \.(\w+) import", f.read_text(), flags=re.M)) for stem, f in files.items()}
    for entry in ("configuration_acttail", "modeling_acttail"):  # the files auto_map names
        reached, todo = set(), [entry]
        while todo:
            for module in direct[todo.pop()] - reached:
                reached.add(module)
                todo.append(module)
        assert reached - {entry} <= direct[entry], (entry, reached - direct[entry])


def test_failed_write_leaves_nothing_and_keeps_the_old_checkpoint(tiny_models, tmp_path):
    source = resolve_model(str(tiny_models["llama"]))
    broken = dataclasses.replace(source, weight_files=(tmp_path / "vanished.safetensors",))
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        write_checkpoint(broken, out, {}, {"README.md": b"card"})
    assert not out.exists()
    out.mkdir()
    old = '{"model_type": "acttail_llama", "activation_sparsity": {"format_version": 1}}'  # a previous export
    (out / "config.json").write_text(old)
    with pytest.raises(FileNotFoundError):
        write_checkpoint(broken, out, {}, {"README.md": b"card"}, overwrite=True)
    assert (out / "config.json").read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
