"""Tiny random-initialised llama / mistral / qwen2 / qwen3 models: export, then load through the shipped code."""

import json

import pytest

from conftest import TINY_ARCHITECTURES, invoke_cli, make_tiny_model, read_block, run_cli, run_fresh_json
from test_cli_errors import assert_one_line_failure


def export(*args) -> None:
    """``acttail-export export ARGS`` in this process (the console script's own process is tested elsewhere); what
    these tests check is the checkpoint, loaded in a fresh process."""
    result = invoke_cli("export", *args)
    assert result.exit_code == 0, result.stderr[-3000:]


CHECK = """
    import torch, transformers
    from transformers import AutoModelForCausalLM
    base = getattr(transformers, {base_class!r}).from_pretrained({base!r}).eval()
    dense = AutoModelForCausalLM.from_pretrained({dense!r}, trust_remote_code=True).eval()
    sparse = AutoModelForCausalLM.from_pretrained({sparse!r}, trust_remote_code=True).eval()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        report(dense_equal=torch.equal(base(ids).logits, dense(ids).logits),
               sparse_differs=not torch.allclose(base(ids).logits, sparse(ids).logits))
        cached = sparse.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
        uncached = sparse.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    report(cache_equal=torch.equal(cached, uncached),
           kinds=sorted({{type(m).__name__ for n, m in sparse.named_modules() if n.endswith("_proj")}}),
           qkv_bias=sparse.model.layers[0].self_attn.q_proj.bias is not None)
"""


@pytest.mark.parametrize("arch", list(TINY_ARCHITECTURES))
def test_tiny_architecture_round_trip(arch, tiny_models, tmp_path):
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    export(tiny_models[arch], dense, "--sparsity", "0", "--allocation", "uniform")
    export(tiny_models[arch], sparse, "--sparsity", "0.5", "--allocation", "acttail")
    config = json.loads((sparse / "config.json").read_text())
    assert config["model_type"] == f"acttail_{arch}"
    assert len(read_block(sparse)["modules"]) == 14
    report = run_fresh_json(CHECK.format(base_class=TINY_ARCHITECTURES[arch][1], base=str(tiny_models[arch]),
                                         dense=str(dense), sparse=str(sparse)), tmp_path)
    assert report["dense_equal"] is True
    assert report["sparse_differs"] is True
    assert report["cache_equal"] is True
    assert report["kinds"] == ["TopKLinear"]
    assert report["qkv_bias"] is (arch == "qwen2")


def test_sharded_bf16_input_and_dtype_conversion(tmp_path):
    folder = make_tiny_model("llama", tmp_path / "tiny", dtype=__import__("torch").bfloat16)
    # Re-save sharded, as large Hub models are.
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    export(tmp_path / "sharded", out, "--sparsity", "0.4", "--allocation", "acttail", "--dtype", "float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*.safetensors")}
    report = run_fresh_json(f"""
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        report(dtype=str(m.model.layers[1].mlp.down_proj.weight.dtype))
    """, tmp_path)
    assert report["dtype"] == "torch.float16"


def test_input_model_code_is_never_run(tiny_models, tmp_path):
    folder = tmp_path / "with_code"
    folder.mkdir()
    for file in tiny_models["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    marker = tmp_path / "code_was_run"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.Config", "AutoModelForCausalLM": "evil.Model"}
    (folder / "config.json").write_text(json.dumps(config))
    # export refuses it (a checkpoint on the stock architecture would silently differ from what that code defines)
    result = run_cli("export", folder, tmp_path / "out", "--sparsity", "0.5", check=False)
    assert_one_line_failure(result, "config.json auto_map AutoConfig names 'evil.Config': the model ships its own code")
    assert not (tmp_path / "out").exists()
    run_cli("analyze", folder)  # reads the weights only
    assert not marker.exists()


# A fresh process with the export at {out} loaded, recording (input, output) of every call of layer 1's down_proj
DOWN_PROJ_CALLS = """
        import torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True).eval()
        proj = model.model.layers[1].mlp.down_proj
        seen = []
        proj.register_forward_hook(lambda m, a, o: seen.append((a[0], o)))
"""


@pytest.mark.parametrize("prefill", ["dense", "0.5"])
def test_prefill_policy_sparsifies_the_right_tokens(prefill, tiny_models, tmp_path):
    out = tmp_path / "out"
    export(tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail", "--prefill", prefill)
    assert read_block(out)["prefill"] == (prefill if prefill == "dense" else 0.5)
    report = run_fresh_json(DOWN_PROJ_CALLS.format(out=str(out)) + """
        ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids)
            model(ids[:, :1])
            (x, y), (x1, y1) = seen
            dense_rows = (F.linear(x, proj.weight) - y).abs().amax(-1)[0] < 1e-6
            report(dense_rows=dense_rows.tolist(), decode_sparse=bool((F.linear(x1, proj.weight) - y1).abs().max() > 1e-4))
    """, tmp_path)
    expected = [True] * 9 if prefill == "dense" else [True] * 4 + [False] * 5  # last ceil(0.5 * 9) = 5 tokens sparse
    assert report["dense_rows"] == expected
    assert report["decode_sparse"] is True


def test_fractional_prefill_counts_each_padded_prompt_its_own_tokens(tiny_models, tmp_path):
    """A left-padded batch sparsifies the last ceil(f * n) of each prompt's own n tokens (as vLLM does per request),
    so each prompt's logits are those it gets alone; the padded length would make the short prompt all sparse."""
    out = tmp_path / "out"
    export(tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail", "--prefill", "0.5")
    report = run_fresh_json(DOWN_PROJ_CALLS.format(out=str(out)) + """
        ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
        ids[1, :4] = 0  # row 1: 4 pads, then its 5 tokens
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        with torch.no_grad():
            batch = model(ids, attention_mask=mask).logits
            alone = [model(ids[:1]).logits[0], model(ids[1:, 4:]).logits[0]]
        x, y = seen[0]
        dense_rows = (F.linear(x, proj.weight) - y).abs().amax(-1) < 1e-6
        report(dense_rows=dense_rows.tolist(), rows_cleared=getattr(getattr(model, "_prompt", None), "rows", None) is None,
               gap=[float((batch[0] - alone[0]).abs().max()), float((batch[1, 4:] - alone[1]).abs().max())])
    """, tmp_path)
    assert report["dense_rows"][0] == [True] * 4 + [False] * 5  # 9 tokens: the last 5 sparse
    assert report["dense_rows"][1][4:] == [True] * 2 + [False] * 3  # its own 5 tokens: the last 3 sparse
    assert report["rows_cleared"] is True
    assert max(report["gap"]) < 1e-4, report["gap"]
