"""TEAL's block-wise greedy allocation on a tiny random model: rows, budget, sites, and agreement with a plain greedy that
runs the whole model for every candidate."""

import math

import pytest
import torch

from acttail_export.allocation import BUDGET_TOLERANCE, effective_sparsity, keep_count
from acttail_export.calibration import Calibration
from acttail_export.greedy import ERROR_FRACTION, block_shares, search_block
from acttail_export.kernels.topk import topk_sparsify
from acttail_export.methods import Method, build_block
from acttail_export.modeling.projections import PROJECTION_KINDS
from acttail_export.weights import resolve_model
from conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # Larger random weights than the default 0.02: with those the block-output errors of most raises are ~0 and tie.
    source = resolve_model(str(make_tiny_model("llama", tmp_path_factory.mktemp("greedy") / "llama", initializer_range=0.2)))
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    return source, Calibration(source, ids, greedy_windows=2, progress=False)


def test_rows_are_monotone_and_each_raise_adds_one_step(tiny):
    source, calibration = tiny
    step = 0.05
    rows = calibration.greedy_rows("all", step, up_to=0.9)
    assert sorted(rows) == [0, 1]
    for layer_rows in rows.values():
        assert layer_rows[0].block_sparsity == 0 and layer_rows[-1].block_sparsity >= 0.9
        for before, after in zip(layer_rows, layer_rows[1:]):
            assert all(after.sparsity[k] >= before.sparsity[k] for k in PROJECTION_KINDS)
            assert sum(after.sparsity[k] > before.sparsity[k] for k in PROJECTION_KINDS) == 1
            # one raise adds one step of block sparsity, less only where a projection hit the 0.99 cap
            gain = after.block_sparsity - before.block_sparsity
            assert 0 < gain <= step + 1e-9
            assert gain > step - 1e-9 or 0.99 in after.sparsity.values()


@pytest.mark.parametrize("mode", ["topk", "threshold"])
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_teal_greedy_meets_the_budget(tiny, mode, target):
    source, calibration = tiny
    alphas = {p.name: 2.0 for p in source.projections}
    block, modules = build_block(source, target, Method("teal-greedy", mode, greedy_step=0.01), alphas, calibration)
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE
    assert block["method"] == "teal-greedy" and block["calibration"]["greedy_step"] == 0.01
    sparsities = {round(m.sparsity, 2) for m in modules.values()}
    assert len(sparsities) > 3  # the search gave the projections different sparsities
    if mode == "threshold":
        assert all((spec["threshold"] > 0) == (spec["keep"] < spec["in_features"]) for spec in block["modules"].values())


@pytest.mark.parametrize("allocation", ["teal-greedy", "uniform", "acttail"])
def test_mlp_sites_leave_attention_dense_and_meet_the_budget(tiny, allocation):
    source, calibration = tiny
    alphas = {p.name: 1.5 + i / 10 for i, p in enumerate(source.projections)}
    method = Method(allocation, "threshold", sites="mlp", greedy_step=0.01)
    block, modules = build_block(source, 0.4, method, alphas, calibration)
    assert abs(effective_sparsity(modules) - 0.4) <= BUDGET_TOLERANCE
    for name, spec in block["modules"].items():
        attention = ".self_attn." in name
        assert (spec["keep"] == spec["in_features"]) == attention, name
        assert (spec["threshold"] == 0) == attention, name
    assert block["sites"] == "mlp"


def test_search_makes_the_choices_of_a_plain_greedy(tiny):
    """The search caches and replays parts of the block; a plain greedy runs the whole model (layer 0 sparsified through
    hooks) for every candidate and reads layer 0's output. Both must raise the same projections in the same order."""
    from transformers import AutoModelForCausalLM

    source, calibration = tiny
    model, ids = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32).eval(), calibration.ids
    captured = {}

    def keep_attention_call(module, args, kwargs):  # the call the model makes, replayed on another normed input
        captured["attention"] = (lambda h: module(h, *args[1:], **kwargs)) if args else \
            (lambda h: module(**{**kwargs, "hidden_states": h}))

    def keep_input(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]

    handles = [model.model.layers[0].register_forward_pre_hook(keep_input, with_kwargs=True),
               model.model.layers[0].self_attn.register_forward_pre_hook(keep_attention_call, with_kwargs=True)]
    with torch.inference_mode():
        model(ids, use_cache=False)  # a cache in the recorded arguments would grow with every replay
    for handle in handles:
        handle.remove()
    projections = [p for p in source.projections if p.layer == 0]
    linears = {p.kind: model.get_submodule(p.name) for p in projections}
    shares = block_shares(projections)
    step, rounds = 0.03, 12

    def layer0_output(keep):
        hooks = [linears[kind].register_forward_pre_hook(lambda m, a, k=keep[kind]: (topk_sparsify(a[0], k),))
                 for kind in linears]
        try:
            with torch.inference_mode():
                return model(ids, output_hidden_states=True).hidden_states[1]
        finally:
            for hook in hooks:
                hook.remove()

    dense = layer0_output({kind: m.in_features for kind, m in linears.items()})
    tail = slice(ids.shape[1] - math.ceil(ERROR_FRACTION * ids.shape[1]), None)
    sparsity = dict.fromkeys(PROJECTION_KINDS, 0.0)
    plain = []
    for _ in range(rounds):
        errors = {}
        for kind in PROJECTION_KINDS:
            trial = {**sparsity, kind: min(sparsity[kind] + step / shares[kind], 0.99)}
            keep = {k: keep_count(s, linears[k].in_features) for k, s in trial.items()}
            errors[kind] = float((layer0_output(keep) - dense)[:, tail].pow(2).sum())
        best = min(errors, key=errors.get)
        sparsity[best] = min(sparsity[best] + step / shares[best], 0.99)
        plain.append(best)

    rows = search_block(model.get_submodule("model.layers.0"), projections, captured["x"], captured["attention"], dense,
                        PROJECTION_KINDS, step, up_to=step * rounds - 1e-9)
    raised = [next(k for k in PROJECTION_KINDS if after.sparsity[k] > before.sparsity[k])
              for before, after in zip(rows, rows[1:])]
    assert raised == plain
    assert len(set(plain)) > 2
