"""The threshold runtime mode (TEAL): the block format's checks, calibration on SmolLM2 that meets its target on held-out
text, and a CLI-exported threshold checkpoint loaded in a fresh process."""

import json
import math

import pytest

from acttail_export.modeling.activation_sparsity import validate_activation_sparsity
from conftest import read_block, run_cli, run_fresh_json
from test_cli_errors import assert_one_line_failure

TARGET = 0.5


def threshold_block(**threshold) -> dict:
    spec = {"keep": 4, "in_features": 8, **threshold}
    return {"format_version": 1, "mode": "threshold", "modules": {"model.layers.0.mlp.up_proj": spec}}


@pytest.mark.parametrize(("block", "message"), [
    ({**threshold_block(threshold=0.1), "mode": "magic"}, "mode must be one of"),
    (threshold_block(), "needs a finite threshold >= 0, got None"),
    (threshold_block(threshold=-0.5), "got -0.5"),
    (threshold_block(threshold=math.nan), "got nan"),
    (threshold_block(threshold=math.inf), "got inf"),
    (threshold_block(threshold="0.5"), "got '0.5'"),
    (threshold_block(threshold=True), "got True"),
])
def test_bad_mode_or_threshold_is_refused(block, message):
    with pytest.raises(ValueError, match=message):
        validate_activation_sparsity(block)


def test_mode_is_optional_and_thresholds_only_needed_in_threshold_mode():
    validate_activation_sparsity(threshold_block(threshold=0.0))
    topk = threshold_block()
    del topk["mode"]  # a block written before the mode existed
    validate_activation_sparsity(topk)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda block: block.update(mode="magic"), "activation_sparsity.mode must be one of"),
    (lambda block: block.update(mode="threshold"), "needs a finite threshold >= 0, got None"),
])
def test_checkpoint_with_bad_block_is_refused_in_one_line(tiny_models, tmp_path, edit, message):
    out = tmp_path / "bad"
    run_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail")
    config = json.loads((out / "config.json").read_text())
    edit(config["activation_sparsity"])
    (out / "config.json").write_text(json.dumps(config))
    assert_one_line_failure(run_cli("eval", out, "--windows", "1", "--seqlen", "8", check=False), message)


@pytest.fixture(scope="module")
def smollm2_threshold(smollm2, tmp_path_factory):
    """SmolLM2 exported by the CLI in threshold mode, uniform 50% (TEAL without its greedy allocation)."""
    out = tmp_path_factory.mktemp("threshold") / "smollm2-threshold-50"
    run_cli("export", smollm2.folder, out, "--sparsity", TARGET, "--allocation", "uniform", "--mode", "threshold",
            "--calibration-windows", "4")
    return out


def test_block_records_mode_thresholds_and_calibration(smollm2_threshold):
    block = read_block(smollm2_threshold)
    assert (block["mode"], block["sites"], block["method"]) == ("threshold", "all", "uniform")
    assert block["calibration"] == {"text": "bundled Wikipedia text", "windows": 4, "seqlen": 512}
    thresholds = [spec["threshold"] for spec in block["modules"].values()]
    assert len(thresholds) == 210 and all(t > 0 for t in thresholds)
    assert all(spec["keep"] == round(0.5 * spec["in_features"]) for spec in block["modules"].values())
    card = (smollm2_threshold / "README.md").read_text()
    assert "runtime mode `threshold`" in card and "| threshold |" in card


def test_measured_sparsity_on_held_out_text_meets_the_target(smollm2_threshold, wiki_text):
    """Calibrated on windows from the end of the text, measured on the evaluation windows from its start."""
    from acttail_export.evaluate import load_model, measured_sparsity, tokenize_windows

    model, tokenizer = load_model(str(smollm2_threshold))
    measured = measured_sparsity(model, tokenize_windows(tokenizer, wiki_text, 512, 2))
    assert abs(measured - TARGET) <= 0.02, measured
    # The same measure on the TopK block of the same allocation is exact: the measure counts what the mode zeroes.
    block = read_block(smollm2_threshold)
    model.set_activation_sparsity({**block, "mode": "topk"})
    topk = measured_sparsity(model, tokenize_windows(tokenizer, wiki_text, 512, 1))
    assert topk == pytest.approx(block["effective_sparsity"], abs=1e-6)


def test_fresh_process_zeroes_exactly_the_entries_at_or_below_the_threshold(smollm2_threshold, tmp_path):
    report = run_fresh_json(f"""
        import json, torch
        import torch.nn.functional as F
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(smollm2_threshold)!r}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        block = json.load(open(path + "/config.json"))["activation_sparsity"]
        checked = {{"prefill": 0, "decode": 0}}
        def hook(module, args, output, name=None):
            x, t = args[0], block["modules"][name]["threshold"]
            assert module.threshold == t
            kept = torch.where(x.abs() > t, x, 0)
            torch.testing.assert_close(module.sparsify(x), kept, rtol=0, atol=0)
            # decode steps sum the kept rows on the CPU path: fp32 in another order than a dense matmul, so the
            # output is held to float64 within fp32 rounding of its sum of |x_i w_i| (the order varies with threads)
            bias = None if module.bias is None else module.bias.double()
            exact = F.linear(kept.double(), module.weight.double(), bias)
            scale = F.linear(kept.abs().double(), module.weight.abs().double(), None if bias is None else bias.abs())
            assert ((output.double() - exact).abs() <= 1e-5 * scale + 1e-7).all(), name
            checked["decode" if x.shape[-2] == 1 else "prefill"] += 1
        handles = [model.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
                   for name in block["modules"]]
        ids = tok("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", return_tensors="pt")
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=3, do_sample=False)
        report(checked=checked,
               planned=sorted({{m.group.path if m.group else "reference" for m in model.topk_modules().values()}}))
        for h in handles:
            h.remove()
        # The mode switches both ways on the loaded model.
        model.set_activation_sparsity({{**block, "mode": "topk"}})
        up = model.model.layers[3].mlp.up_proj
        x = torch.randn(5, 576)
        report(topk_threshold=up.threshold, topk_kept=int((up.sparsify(x) != 0).sum(-1).unique().item()), topk_keep=up.keep)
        model.set_activation_sparsity(block)
        report(threshold_back=up.threshold == block["modules"]["model.layers.3.mlp.up_proj"]["threshold"])
    """, tmp_path)
    # prefill: 210 projections; then 2 decode steps x 210 (the third token needs no forward)
    assert report["checked"] == {"prefill": 210, "decode": 420}
    # Decode steps in threshold mode read only the kept weight rows (the CPU path, planned by generate).
    assert report["planned"] == ["cpu"]
    assert report["topk_threshold"] is None and report["topk_kept"] == 288 and report["topk_keep"] == 288
    assert report["threshold_back"] is True
