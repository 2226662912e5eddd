from pathlib import Path

import numpy as np
import pytest

from acttail_export.allocation import BUDGET_TOLERANCE, GreedyRow, allocate, effective_sparsity, keep_count
from acttail_export.errors import ExportError
from acttail_export.modeling.projections import PROJECTION_KINDS
from acttail_export.weights import Projection


def llama_like(layers: int = 4, d: int = 576, d_kv: int = 192, d_ff: int = 1536) -> list[Projection]:
    shapes = {"q": (d, d), "k": (d_kv, d), "v": (d_kv, d), "o": (d, d), "gate": (d_ff, d), "up": (d_ff, d), "down": (d, d_ff)}
    return [
        Projection(f"model.layers.{i}.{'mlp' if kind in ('gate', 'up', 'down') else 'self_attn'}.{kind}_proj", i, kind,
                   *shapes[kind], Path("model.safetensors"))
        for i in range(layers) for kind in shapes
    ]


def random_alphas(projections, seed=0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {p.name: float(rng.uniform(1.5, 5.0)) for p in projections}


@pytest.mark.parametrize("method", ["acttail", "uniform", "block"])
@pytest.mark.parametrize("target", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("sparser", ["heavy-tail", "light-tail"])
def test_effective_sparsity_meets_budget_after_rounding(method, target, sparser):
    projections = llama_like()
    modules = allocate(projections, random_alphas(projections), target, method, epsilon=0.4, sparser=sparser)
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE
    for p in projections:
        assert 1 <= modules[p.name].keep <= p.in_features


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_budget_is_met_on_a_tiny_one_layer_model(target):
    # Few, small projections: only a search over which keep count to move can land on the budget.
    projections = llama_like(layers=1, d=8, d_kv=4, d_ff=16)
    modules = allocate(projections, random_alphas(projections, seed=5), target, "acttail", epsilon=0.5)
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_uniform_keeps_one_count_per_input_width(target):
    projections = llama_like(layers=30)
    modules = allocate(projections, random_alphas(projections), target, "uniform")
    assert {(m.in_features, m.keep) for m in modules.values()} == {(576, keep_count(target, 576)), (1536, keep_count(target, 1536))}


def test_effective_sparsity_is_parameter_weighted():
    projections = llama_like(layers=1)
    modules = allocate(projections, random_alphas(projections), 0.5, "acttail")
    params = sum(p.params for p in projections)
    expected = sum(p.params * (1 - modules[p.name].keep / p.in_features) for p in projections) / params
    assert effective_sparsity(modules) == pytest.approx(expected)


def test_heavy_tail_direction_gives_small_alpha_more_sparsity():
    projections = llama_like()
    alphas = random_alphas(projections, seed=3)
    heavy = allocate(projections, alphas, 0.5, "acttail", 0.3, "heavy-tail")
    light = allocate(projections, alphas, 0.5, "acttail", 0.3, "light-tail")
    order = sorted(projections, key=lambda p: alphas[p.name])
    smallest, largest = order[0].name, order[-1].name
    assert heavy[smallest].sparsity > heavy[largest].sparsity
    assert light[smallest].sparsity < light[largest].sparsity


def test_linear_rule_spread_is_epsilon():
    # All projections the same shape, so the unrounded rule is s = eta * ((1 - eps) + 2 eps r) with eta = S.
    projections = [p for p in llama_like(layers=6) if p.kind == "q"]
    alphas = {p.name: 2.0 + i for i, p in enumerate(projections)}
    modules = allocate(projections, alphas, 0.5, "acttail", epsilon=0.2, sparser="light-tail")
    s = [modules[p.name].sparsity for p in projections]
    assert s[0] == pytest.approx(0.5 * 0.8, abs=1 / 576)
    assert s[-1] == pytest.approx(0.5 * 1.2, abs=1 / 576)
    assert s == sorted(s)


@pytest.mark.parametrize("method", ["acttail", "block", "uniform"])
@pytest.mark.parametrize(("target", "s_min", "s_max"), [(0.8, 0.6, 0.9), (0.5, 0.45, 0.55), (0.7, 0.3, 0.8)])
def test_clipping_bounds_are_respected_and_budget_resolved(method, target, s_min, s_max):
    # 0.45 * 576 = 259.2 and 0.55 * 576 = 316.8 inputs kept: a count rounded to nearest would break a bound by 0.0003
    projections = llama_like()
    modules = allocate(projections, random_alphas(projections), target, method, epsilon=0.9, s_min=s_min, s_max=s_max)
    for p in projections:
        assert s_min <= modules[p.name].sparsity <= s_max, (p.name, modules[p.name])
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE


@pytest.mark.parametrize("method", ["acttail", "block", "uniform"])
@pytest.mark.parametrize(("target", "s_min", "s_max"), [(0.6, 0.0, 0.6), (0.9, 0.0, 0.9), (0.5, 0.5, 0.5),
                                                        (0.75, 0.75, 0.75)])
def test_a_target_equal_to_max_sparsity_is_reached(method, target, s_min, s_max):
    # every projection at s_max: their float weighted mean is 0.8999999999999999 for 0.9, which must still count
    projections = llama_like()
    modules = allocate(projections, random_alphas(projections), target, method, epsilon=0.3, s_min=s_min, s_max=s_max)
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE
    assert all(s_min <= m.sparsity <= s_max for m in modules.values())


def test_bounds_that_no_keep_count_fits_are_refused():
    projections = llama_like()  # 0.1 * 576 = 57.6 inputs: no integer count has sparsity exactly 0.9
    with pytest.raises(ExportError, match=r"no TopK count of a projection with 576 inputs .* --min-sparsity 0.9 and "
                                          r"--max-sparsity 0.9"):
        allocate(projections, random_alphas(projections), 0.9, "uniform", s_min=0.9, s_max=0.9)


def test_epsilon_zero_is_uniform():
    projections = llama_like()
    a = allocate(projections, random_alphas(projections), 0.5, "acttail", epsilon=0.0)
    b = allocate(projections, random_alphas(projections), 0.5, "uniform")
    assert {n: m.keep for n, m in a.items()} == {n: m.keep for n, m in b.items()}


def test_block_allocation_gives_one_ratio_per_block():
    projections = llama_like()
    modules = allocate(projections, random_alphas(projections), 0.5, "block", epsilon=0.5)
    for layer in range(4):
        ratios = [m.sparsity for n, m in modules.items() if f".layers.{layer}." in n]
        assert max(ratios) - min(ratios) <= 2 / 576, ratios  # equal up to rounding k to integers


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": 1.0}, "sparsity must be in"),
    ({"target": -0.1}, "sparsity must be in"),
    ({"target": 0.5, "epsilon": 1.5}, "epsilon must be in"),
    ({"target": 0.5, "s_max": 0.4}, "max-sparsity"),
    ({"target": 0.5, "method": "magic"}, "unknown allocation 'magic'"),
    ({"target": 0.5, "sparser": "sideways"}, "unknown direction 'sideways'"),
])
def test_bad_allocation_arguments_are_refused(kwargs, message):
    projections = llama_like(layers=1)
    with pytest.raises(ExportError, match=message):
        allocate(projections, random_alphas(projections), **kwargs)


@pytest.mark.parametrize("method", ["acttail", "uniform", "block"])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.7])
def test_mlp_sites_keep_attention_dense_and_meet_the_budget_over_all_projections(method, target):
    projections = llama_like()
    modules = allocate(projections, random_alphas(projections), target, method, sites="mlp")
    assert abs(effective_sparsity(modules) - target) <= BUDGET_TOLERANCE
    for p in projections:
        assert (modules[p.name].keep == p.in_features) == (p.kind in ("q", "k", "v", "o")), p.name


def test_mlp_sites_refuse_a_target_the_mlp_cannot_reach():
    projections = llama_like()  # MLP: 75% of the projection weights
    with pytest.raises(ExportError, match=r"cannot be reached with --sites mlp: .* 75.0% .* 1.067 > --max-sparsity 0.99"):
        allocate(projections, random_alphas(projections), 0.8, "uniform", sites="mlp")
    allocate(projections, random_alphas(projections), 0.74, "uniform", sites="mlp")


def test_teal_greedy_takes_each_blocks_row_closest_to_the_target():
    projections = llama_like(layers=2)
    rows = {layer: [GreedyRow(s, dict.fromkeys(PROJECTION_KINDS, s)) for s in np.arange(0, 0.91, 0.005 * (layer + 1))]
            for layer in range(2)}
    modules = allocate(projections, random_alphas(projections), 0.4, "teal-greedy", greedy_rows=rows)
    assert abs(effective_sparsity(modules) - 0.4) <= BUDGET_TOLERANCE
    coarse = {layer: [GreedyRow(s, dict.fromkeys(PROJECTION_KINDS, s)) for s in (0.0, 0.3, 0.6)] for layer in range(2)}
    with pytest.raises(ExportError, match="use a smaller --greedy-step"):
        allocate(projections, random_alphas(projections), 0.4, "teal-greedy", greedy_rows=coarse)
    with pytest.raises(ExportError, match="needs the greedy rows"):
        allocate(projections, random_alphas(projections), 0.4, "teal-greedy")
