"""Layer-by-layer calibration and the ``calibrated`` allocation: the layer-by-layer pass equals the whole-model pass on
SmolLM2 (thresholds, greedy rows, the curves of several passes), the Fisher curves equal their definition, the budget
split is optimal and exact, and a CLI export loads through the real transformers loader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from acttail_export.allocation import BUDGET_TOLERANCE, allocate, effective_sparsity
from acttail_export.calibration import SAMPLES_PER_INPUT, Calibration, calibration_ids
from acttail_export.fisher import calibrated_sparsity, split_budget, topk_curves
from acttail_export.greedy import search_block
from acttail_export.kernels.topk import threshold_sparsify, topk_sparsify
from acttail_export.methods import Method, build_block
from acttail_export.weights import Projection, resolve_model
from conftest import TINY_ARCHITECTURES, make_tiny_model, read_block, run_cli, run_fresh_json
from test_cli_errors import assert_one_line_failure

SEQLEN = 128


@pytest.fixture(scope="module")
def calibration(smollm2, wiki_text):
    """Two calibration windows of 128 tokens from the end of the bundled text, run layer by layer."""
    return Calibration(smollm2, calibration_ids(smollm2, wiki_text, 2, SEQLEN), "bundled Wikipedia text", progress=False)


def test_calibration_windows_retry_on_the_whole_text(smollm2, wiki_text):
    """A text whose end is long blank runs: its last 8 characters a token hold too few tokens, the whole text enough."""
    from acttail_export.evaluate import load_tokenizer

    tokenizer = load_tokenizer(smollm2.folder)
    text = wiki_text[:60000] + ("\n" + " " * 400) * 300
    ids = calibration_ids(smollm2, text, 8, 256)
    assert ids.flatten().tolist() == tokenizer(text)["input_ids"][-8 * 256:]


@pytest.fixture(scope="module")
def whole_model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def alphas(smollm2):
    from acttail_export.spectra import estimator_alphas

    return estimator_alphas(smollm2, ("mid",), log=lambda line: None)["mid"]


def whole_model_thresholds(model, ids: torch.Tensor, modules: dict, samples: int) -> dict[str, float]:
    """The thresholds' definition on the whole model, all windows in one batch: in forward order, t_p = the
    s_p-quantile of |x| at p's input (over a seeded random subset of ``samples`` entries when there are more), the
    input thresholded before the model goes on."""
    generator = torch.Generator().manual_seed(0)
    last = {"input": None, "sorted": None}  # q/k/v (gate/up) are called with one input object: sampled once
    thresholds = {}

    def hook(name):
        def threshold(module, args):
            x = args[0]
            if last["input"] is not x:
                flat = x.abs().flatten()
                if flat.numel() > samples:
                    flat = flat[torch.randint(flat.numel(), (samples,), generator=generator)]
                last.update(input=x, sorted=flat.sort().values)
            rank = round(modules[name].sparsity * len(last["sorted"]))
            thresholds[name] = float(last["sorted"][rank - 1]) if rank > 0 else 0.0
            return (threshold_sparsify(x, thresholds[name]),)
        return threshold

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in modules]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return thresholds


def test_layerwise_thresholds_equal_the_whole_model_pass(smollm2, calibration, whole_model, alphas):
    modules = allocate(smollm2.projections, alphas, 0.5)
    expected = whole_model_thresholds(whole_model, calibration.ids, modules, SAMPLES_PER_INPUT)
    assert len(expected) == 210 and all(t > 0 for t in expected.values())
    assert calibration.thresholds(modules) == expected  # bit for bit: the same operations on the same batch


@pytest.mark.parametrize("chunk_tokens", [SEQLEN, 3 * SEQLEN])
def test_thresholds_in_chunks_of_windows_equal_one_batch(smollm2, wiki_text, whole_model, alphas, chunk_tokens):
    """Windows run through each layer a chunk at a time (4 chunks of one window, or 3 + 1) give the thresholds of
    the whole batch, sampled entries included (fewer samples than entries here), up to float rounding."""
    ids = calibration_ids(smollm2, wiki_text, 4, SEQLEN)
    modules = allocate(smollm2.projections, alphas, 0.5)
    samples = 40_000  # of 4 x 128 x 576 = 295k entries at q/k/v's input
    expected = whole_model_thresholds(whole_model, ids, modules, samples)
    chunked = Calibration(smollm2, ids, samples=samples, chunk_tokens=chunk_tokens, progress=False)
    assert chunked.chunk_windows < 4
    got = chunked.thresholds(modules)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("arch,overrides", [(arch, {}) for arch in TINY_ARCHITECTURES] +
                         [("mistral", {"sliding_window": 8}), ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
                                                                          "max_window_layers": 1})])
def test_thresholds_in_chunks_equal_one_batch_on_every_architecture(tmp_path, arch, overrides):
    source = resolve_model(str(make_tiny_model(arch, tmp_path / arch, initializer_range=0.2, **overrides)))
    ids = torch.randint(source.config["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1))
    every = allocate(source.projections, {p.name: 2.0 for p in source.projections}, 0.5, "uniform")
    some = {name: m for name, m in every.items() if name.endswith(("k_proj", "o_proj", "up_proj"))}  # others dense
    for modules in (every, some):
        one_batch = Calibration(source, ids, samples=1000, progress=False).thresholds(modules)
        chunked = Calibration(source, ids, samples=1000, chunk_tokens=40, progress=False)  # 1 window a chunk
        assert chunked.chunk_windows == 1
        got = chunked.thresholds(modules)
        assert one_batch.keys() == modules.keys() and all(t > 0 for t in one_batch.values())
        assert got == pytest.approx(one_batch, rel=1e-5)


def test_layerwise_greedy_rows_equal_the_whole_model_search(smollm2, calibration, whole_model):
    rows = calibration.greedy_rows("all", 0.1, 0.5)
    assert sorted(rows) == list(range(30))
    captured = {}

    def keep(i):
        def hook(module, args, kwargs):
            captured.setdefault(i, {})["in"] = args[0] if args else kwargs["hidden_states"]
        return hook

    def keep_out(i):
        def hook(module, args, kwargs, output):
            captured[i]["out"] = output[0] if isinstance(output, tuple) else output
        return hook

    def keep_attention(i):
        def hook(module, args, kwargs):
            captured[i]["attention"] = (lambda h: module(h, *args[1:], **kwargs)) if args else \
                (lambda h: module(**{**kwargs, "hidden_states": h}))
        return hook

    layers = (0, 29)
    handles = []
    for i in layers:
        layer = whole_model.model.layers[i]
        handles += [layer.register_forward_pre_hook(keep(i), with_kwargs=True),
                    layer.register_forward_hook(keep_out(i), with_kwargs=True),
                    layer.self_attn.register_forward_pre_hook(keep_attention(i), with_kwargs=True)]
    try:
        with torch.inference_mode():
            whole_model(input_ids=calibration.ids[:1], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    for i in layers:
        projections = [p for p in smollm2.projections if p.layer == i]
        expected = search_block(whole_model.model.layers[i], projections, captured[i]["in"], captured[i]["attention"],
                                captured[i]["out"], ("q", "k", "v", "o", "gate", "up", "down"), 0.1, 0.5)
        assert rows[i] == expected, i


@pytest.mark.parametrize("shape", [(7, 16), (33, 40)])
def test_curves_equal_their_definition(shape):
    """C(j) = sum_t (u_t . (x_t - x_t kept))^2 with TopK keeping d_in - j inputs of each token, for each of several
    projections reading one input (ranked once)."""
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=generator)
    us = [torch.randn(shape, generator=generator) for _ in range(3)]
    d_in = shape[1]
    for u, curve in zip(us, topk_curves(x, us)):
        assert curve.shape == (d_in + 1,)
        for j in range(d_in + 1):
            dropped = x - topk_sparsify(x, d_in - j) if j < d_in else x
            assert curve[j] == pytest.approx(float(((u * dropped).sum(-1).double() ** 2).sum()), rel=1e-5, abs=1e-6)


def test_curves_of_passes_equal_the_whole_model_gradient(smollm2, calibration, whole_model):
    """The curves read one window a pass, layer by layer, equal those of the whole model's autograd on both windows
    at once (summed next-token loss): the passes add up, and the layer-by-layer backward is the model's gradient."""
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.29.mlp.gate_proj"]
    seen = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = (args[0], output)
        return hook

    handles = [whole_model.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.enable_grad():
            logits = whole_model(input_ids=calibration.ids, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), calibration.ids[:, 1:].flatten(),
                                              reduction="sum").backward()
    finally:
        for handle in handles:
            handle.remove()
        whole_model.zero_grad(set_to_none=True)
    passes = Calibration(calibration.source, calibration.ids, progress=False, curve_windows=2, curve_pass=1)
    curves = passes.curves()
    assert len(curves) == 210
    for name in names:
        x, y = seen[name]
        u = y.grad.flatten(0, -2) @ whole_model.get_submodule(name).weight.detach()
        (expected,) = topk_curves(x.detach().flatten(0, -2), [u])
        np.testing.assert_allclose(curves[name], expected, rtol=2e-3, atol=2e-3 * expected[-1])


def test_split_budget_is_optimal_on_convex_curves():
    """On convex curves the marginal-cost split equals the greedy allocation, one unit at a time (optimal there)."""
    rng = np.random.default_rng(0)
    sizes = [12, 20, 9, 30]
    # increasing increments: convex curves from C(0) = 0
    curves = [np.concatenate([[0.0], np.cumsum(np.sort(rng.exponential(size=n)))]) for n in sizes]
    weights = np.array([3.0, 1.0, 2.0, 1.0])
    lo, hi = np.zeros(4, dtype=int), np.array(sizes) - 1
    for target in (10.0, 25.0, 41.0):
        chosen = split_budget(curves, weights, lo, hi, target)
        assert abs(float(weights @ chosen) - target) <= weights.max()
        greedy = np.zeros(4, dtype=int)
        while float(weights @ greedy) < float(weights @ chosen):
            marginal = [(curves[p][greedy[p] + 1] - curves[p][greedy[p]]) / weights[p] if greedy[p] < hi[p] else np.inf
                        for p in range(4)]
            greedy[int(np.argmin(marginal))] += 1
        cost = sum(c[j] for c, j in zip(curves, chosen))
        assert cost <= sum(c[j] for c, j in zip(curves, greedy)) + 1e-9


@pytest.mark.parametrize(("curves", "lo", "hi", "target", "expected"), [
    # a curve's minimum inside [lo, hi] (running sums of u * x cross zero): a target at every lo is reachable
    ([[0.0, 4.0, 1.0, 9.0], [0.0, 4.0, 1.0, 9.0]], [1, 1], [3, 3], 2.0, [1, 1]),
    # a curve higher inside its range than at d_in: a target at every hi is reachable
    ([[0.0, 5.0, 10.0, 1.0], [0.0, 0.1, 0.2, 0.3]], [0, 0], [2, 3], 5.0, [2, 3]),
])
def test_split_budget_reaches_targets_at_the_bounds(curves, lo, hi, target, expected):
    chosen = split_budget([np.array(c) for c in curves], np.ones(2), np.array(lo), np.array(hi), target)
    assert chosen.tolist() == expected


@pytest.mark.parametrize(("target", "slope"), [(0.74, -1.0), (0.26, 1.0)])
def test_calibrated_split_keeps_every_projection_within_the_bounds(target, slope):
    """Curves that push every projection to a bound (falling: drop all they may; rising: drop the fewest) stop at the
    count rounded inward: 2.5, 7.5 and 12.5 kept inputs at the bounds would round outward to nearest-even."""
    projections = [Projection(f"p{i}", 0, "q", 4, d, Path("model.safetensors")) for i, d in enumerate((10, 30, 50))]
    curves = {p.name: slope * np.arange(p.in_features + 1) ** 2 for p in projections}
    sparsity = calibrated_sparsity(projections, curves, target, 0.25, 0.75)
    assert all(0.25 <= s <= 0.75 for s in sparsity.values()), sparsity


@pytest.mark.parametrize(("mode", "targets"), [("topk", (0.3, 0.5, 0.7)), ("threshold", (0.5,))])
def test_calibrated_allocation_meets_the_budget(smollm2, calibration, alphas, mode, targets):
    for target in targets:  # threshold mode calibrates thresholds per target: one is enough
        block, modules = build_block(smollm2, target, Method("calibrated", mode), alphas, calibration)
        assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE
        sparsities = [m.sparsity for m in modules.values()]
        assert max(sparsities) - min(sparsities) > 0.2  # the curves move the budget between projections
        assert block["calibration"]["curve_windows"] == 2
        assert (block["mode"] == "threshold") == (mode == "threshold")


@pytest.mark.parametrize(("flags", "message"), [
    (("--epsilon", "auto"), "--epsilon auto needs --allocation acttail"),
    (("--calibration-text", "{short}"), "fewer than 8 windows x 512"),
    (("--calibration-text", "{missing}"), "cannot read text file"),
    (("--calibration-seqlen", "100000"), "--calibration-seqlen 100000 is more than"),
])
def test_bad_calibrated_options_are_one_line(smollm2, tmp_path, flags, message):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("The Eiffel Tower is a wrought-iron lattice tower in Paris. " * 20)
    flags = [flag.format(short=short, missing=tmp_path / "missing.txt") for flag in flags]
    result = run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "calibrated", *flags,
                     check=False)
    assert_one_line_failure(result, message)
    assert not out.exists()


def test_default_export_is_calibrated_and_loads_in_a_fresh_process(smollm2, tmp_path):
    out = tmp_path / "calibrated"
    run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--calibration-windows", "1", "--calibration-seqlen",
            SEQLEN, "--link-weights")  # no --allocation: the default is calibrated
    block = read_block(out)
    assert block["method"] == "calibrated" and abs(block["effective_sparsity"] - 0.5) <= BUDGET_TOLERANCE
    card = (out / "README.md").read_text()
    assert "Fisher estimate of the loss increase" in card and "from its loss-increase curve" in card
    report = run_fresh_json(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = {str(out)!r}
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        keeps = {{name: m.keep for name, m in model.topk_modules().items()}}
        ids = tok("The Eiffel Tower is a wrought-iron lattice tower in Paris, France.", return_tensors="pt")
        with torch.inference_mode():
            loss = float(model(**ids, labels=ids["input_ids"]).loss)
        report(keeps=keeps, loss=loss)
    """, tmp_path)
    assert report["keeps"] == {name: spec["keep"] for name, spec in block["modules"].items()}
    assert 0 < report["loss"] < 10
