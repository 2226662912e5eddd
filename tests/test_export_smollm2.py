"""End to end on the real SmolLM2-135M: export with the CLI, load in a fresh process without acttail_export, generate."""

import hashlib
import json
import os
import re
import subprocess
import sys

from acttail_export.allocation import BUDGET_TOLERANCE
from conftest import read_block, run_cli, run_fresh_json


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_keeps_weights_byte_identical(smollm2, smollm2_50):
    for file in smollm2.weight_files:
        assert sha256(smollm2_50 / file.name) == sha256(file)


def test_export_writes_config_block_code_tokenizer_and_card(smollm2_50):
    config = json.loads((smollm2_50 / "config.json").read_text())
    assert config["model_type"] == "acttail_llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_acttail.ActTailLlamaForCausalLM"
    block = config["activation_sparsity"]
    assert abs(block["effective_sparsity"] - 0.5) <= BUDGET_TOLERANCE
    assert (block["method"], block["estimator"], block["sparser"], block["prefill"]) == ("acttail", "mid", "heavy-tail", "sparse")
    assert len(block["modules"]) == 210
    q0 = block["modules"]["model.layers.0.self_attn.q_proj"]
    assert set(q0) >= {"alpha", "sparsity", "keep", "in_features"} and q0["in_features"] == 576
    # Projections really differ: ActTail is not uniform.
    assert len({m["keep"] for m in block["modules"].values() if m["in_features"] == 576}) > 10
    for name in ("modeling_acttail.py", "configuration_acttail.py", "activation_sparsity.py", "topk.py", "tokenizer.json", "generation_config.json"):
        assert (smollm2_50 / name).is_file(), name
    assert not list(smollm2_50.parent.glob(".*partial*"))


def test_model_card_metadata_figures_and_table(smollm2_50):
    from huggingface_hub import metadata_load

    metadata = metadata_load(smollm2_50 / "README.md")
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"custom_code", "activation-sparsity"} <= set(metadata["tags"])
    card = (smollm2_50 / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| `model.layers.29.mlp.down_proj` |" in card
    assert "acttail-export export" in card and "--sparsity 0.5" in card
    for figure in re.findall(r"!\[[^]]*\]\(([^)]+)\)", card):
        assert (smollm2_50 / figure).read_bytes().startswith(b"\x89PNG\r\n"), figure
    assert len(re.findall(r"!\[", card)) == 2


def test_fresh_process_loads_generates_and_keeps_exactly_k(smollm2_50, tmp_path):
    report = run_fresh_json(f"""
        import json, torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(smollm2_50)!r}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        block = json.load(open(path + "/config.json"))["activation_sparsity"]
        checked = []
        def hook(module, args, output, name=None):
            x = args[0]
            k = block["modules"][name]["keep"]
            # Exact ties happen (GQA heads sharing a value at the first token): they go to the lower index.
            order = x.abs().sort(dim=-1, descending=True, stable=True).indices
            idx = order[..., :k]
            kept = torch.zeros_like(x).scatter(-1, idx, x.gather(-1, idx))
            torch.testing.assert_close(output, F.linear(kept, module.weight, module.bias), rtol=0, atol=2e-5)
            # keep + 1 inputs would give a visibly different output: the count is exact.
            idx1 = order[..., :k + 1]
            more = torch.zeros_like(x).scatter(-1, idx1, x.gather(-1, idx1))
            if k < x.shape[-1]:
                assert (F.linear(more, module.weight, module.bias) - output).abs().max() > 1e-4
            checked.append(name)
        for name in block["modules"]:
            model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        ids = tok("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", return_tensors="pt")
        with torch.inference_mode():
            model(**ids)
        report(checked=len(checked), model_class=type(model).__name__)
        for h in [m for m in model.modules()]:
            h._forward_hooks.clear()
        msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
        inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        report(answer=tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    """, tmp_path)
    assert report["checked"] == 210 and report["model_class"] == "ActTailLlamaForCausalLM"
    assert "Paris" in report["answer"]


def test_loading_without_trust_remote_code_fails_clearly(smollm2_50, tmp_path):
    report = run_fresh_json(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(smollm2_50)!r})
        except Exception as e:
            report(refused=str(e))
    """, tmp_path)
    assert "trust_remote_code=True" in report["refused"]


def test_all_ratios_zero_gives_the_base_logits_exactly(smollm2, tmp_path):
    out = tmp_path / "dense"
    run_cli("export", smollm2.folder, out, "--sparsity", "0", "--allocation", "uniform")
    assert all(m["keep"] == m["in_features"] for m in read_block(out)["modules"].values())
    report = run_fresh_json(f"""
        import torch
        from transformers import AutoModelForCausalLM, LlamaForCausalLM
        ids = torch.tensor([[1, 504, 3458, 282, 253, 2562, 314, 5646, 30]])
        with torch.inference_mode():
            base = LlamaForCausalLM.from_pretrained({str(smollm2.folder)!r}).eval()(ids).logits
            ours = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()(ids).logits
        report(equal=torch.equal(base, ours))
    """, tmp_path)
    assert report["equal"] is True


def test_eval_reports_the_perplexity_the_card_states(smollm2_50):
    """`eval` (default windows) reproduces the numbers `export --eval` wrote into the card."""
    result = run_cli("eval", smollm2_50, "--dense-baseline")
    rows = {line.split()[0]: float(line.split()[-1]) for line in result.stdout.splitlines() if line.startswith("  ")}
    assert 10 < rows["dense"] < 40  # SmolLM2-135M on English Wikipedia
    assert rows["dense"] < rows["acttail"] < 4 * rows["dense"]
    card = (smollm2_50 / "README.md").read_text()
    assert f"**{rows['acttail']:.3f}**, dense {rows['dense']:.3f}" in card


def test_analyze_prints_every_projection(smollm2):
    result = run_cli("analyze", smollm2.folder)
    lines = [line for line in result.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(lines) == 210
    assert lines[0].split()[:2] == ["model.layers.0.self_attn.q_proj", "576x576"]


def test_gguf_path_and_gguf_file_name_are_inputs(smollm2, tmp_path):
    from acttail_export.weights import default_gguf, resolve_model

    gguf = default_gguf()
    by_path = resolve_model(str(gguf))
    by_name = resolve_model(str(gguf.parent), gguf_file=gguf.name)
    assert by_path.folder == by_name.folder == smollm2.folder  # one cached conversion
    assert by_path.model_type == "llama" and len(by_path.projections) == 210


def test_export_peak_memory_stays_bounded(smollm2, tmp_path):
    """Peak RSS of a whole `--allocation acttail` export process (cold spectra, from the converted folder; calibration's
    memory is in BENCHMARKS.md and docs/RESULTS.md): 514 MB on 2026-12-02 (torch,
    transformers' Llama modeling for the completeness check, matplotlib for the card, one weight and its Gram at a
    time). An eager import or a whole-model copy that creeps in shows here first; the 7B-shaped figures are in
    BENCHMARKS.md.

    Read as VmHWM of the export's own address space at exit: ``ru_maxrss`` of a child keeps the high-water mark of the
    forked copy of this (large) test process across exec, and reads 1.8 GB here under a full test session."""
    report = tmp_path / "status"
    code = ("import atexit, sys; from pathlib import Path; "
            f"atexit.register(lambda: Path({str(report)!r}).write_text(Path('/proc/self/status').read_text())); "
            "from acttail_export.cli import main; sys.argv[0] = 'acttail-export'; main()")
    result = subprocess.run([sys.executable, "-P", "-c", code, "export", str(smollm2.folder), str(tmp_path / "out"),
                             "--sparsity", "0.5", "--allocation", "acttail", "--no-spectra-cache"], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    peak_kib = next(int(line.split()[1]) for line in report.read_text().splitlines() if line.startswith("VmHWM:"))
    assert peak_kib / 1024 < 600  # MB


def test_gguf_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """A reinstall of the same GGUF (same bytes, new mtime) reuses its conversion; a new version at the same path
    replaces the older version's conversion; a folder the tool did not write is never touched."""
    import shutil

    from acttail_export.weights import convert_gguf, default_gguf

    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "models" / "smollm2.gguf"
    gguf.parent.mkdir()
    shutil.copyfile(default_gguf(), gguf)
    first = convert_gguf(gguf)
    foreign = first.parent / "not-ours"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")

    shutil.copyfile(default_gguf(), gguf)  # reinstalled
    os.utime(gguf, (gguf.stat().st_atime, gguf.stat().st_mtime + 100))
    assert convert_gguf(gguf) == first
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, "not-ours"])

    data = bytearray(gguf.read_bytes())
    at = data.index(b"Smollm2 135M")  # the model's name in the metadata: a new version, still a valid GGUF
    data[at + 6:at + 7] = b"3"
    gguf.write_bytes(bytes(data))
    second = convert_gguf(gguf)
    assert second != first and (second / "config.json").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([second.name, "not-ours"])


def test_gguf_conversion_draws_no_bar_into_a_pipe(tmp_path):
    """The real conversion of the bundled GGUF (a cold conversion cache) with stdout and stderr piped, as the demo's log
    is: transformers' "Converting and de-quantizing GGUF tensors" bar, like every other bar, only on a terminal."""
    code = ("from acttail_export.weights import convert_gguf, default_gguf; "
            "print((convert_gguf(default_gguf()) / 'config.json').is_file())")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True"]
    assert "GGUF tensors" not in result.stderr + result.stdout  # (hub bars: the CLI's main turns those off)


def test_sparse_decode_path_equals_the_reference_path(smollm2_50, wiki_text, tmp_path):
    """Greedy generation on the CPU gather path gives the reference path's tokens; every decode-step projection matches.

    In float64: TopK is discontinuous, so in float32 a 1e-6 difference of summation order occasionally moves an entry
    across the k-th magnitude, and the two paths' texts can part after a few tokens although every projection agrees.
    """
    report = run_fresh_json(f"""
        import torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(smollm2_50)!r}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float64).eval()
        ids = tok({wiki_text[:600]!r}, return_tensors="pt").input_ids[:, :48]
        worst = []
        def hook(module, args, output):
            x = args[0]
            if x.shape[-2] == 1:  # decode steps only: these take the sparse path
                kept = torch.where(module.sparsify(x) != 0, x, 0)
                ref = F.linear(kept, module.weight, module.bias)
                worst.append(((output - ref).abs().max() / ref.abs().max().clamp(min=1)).item())  # fp32 sum order
        handles = [m.register_forward_hook(hook) for m in model.topk_modules().values()]
        with torch.inference_mode():
            fast = model.generate(ids, max_new_tokens=24, do_sample=False)
            report(checked=len(worst))
            # a batch of 3 rows: a group serves it sparse while 3 x its kept fraction < BATCH_BREAK_EVEN["cpu"]
            rows = tok({wiki_text[2000:6000]!r}, return_tensors="pt").input_ids[:, :96].reshape(3, 32)
            groups = {{m.group for m in model.topk_modules().values() if m.sparse}}
            report(batch_sparse_groups=sum(g.wins(torch.zeros(3, 1, 1, dtype=torch.float64)) for g in groups), groups=len(groups))
            fast_rows = model.generate(rows, max_new_tokens=6, do_sample=False)
            for h in handles:
                h.remove()
            report(planned=sorted({{m.group.path if m.group else "reference" for m in model.topk_modules().values() if m.sparse}}))
            model.set_sparse_backend("reference")
            ref = model.generate(ids, max_new_tokens=24, do_sample=False)
            ref_rows = model.generate(rows, max_new_tokens=6, do_sample=False)
        report(groups_after=sorted({{repr(m.group) for m in model.topk_modules().values()}}),
               backend_after=model.config.sparse_backend, checked_with_batch=len(worst), worst=max(worst),
               same_tokens=torch.equal(fast, ref), same_batch_tokens=torch.equal(fast_rows, ref_rows))
    """, tmp_path)
    assert report["planned"] == ["cpu"]
    assert report["groups_after"] == ["None"] and report["backend_after"] == "reference"
    assert report["checked"] == 4830  # 23 decode steps x 210 projections
    assert report["checked_with_batch"] == 4830 + 5 * 210
    assert 0 < report["batch_sparse_groups"] <= report["groups"]  # the batch took the sparse path in those groups
    assert report["worst"] < 1e-12
    assert report["same_tokens"] is True and report["same_batch_tokens"] is True
