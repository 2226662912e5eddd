"""--epsilon auto: the search picks the lowest calibration perplexity among its trials, records them, meets the budget."""

import json

import pytest
import torch

from acttail_export.allocation import BUDGET_TOLERANCE, allocate
from acttail_export.checkpoint import sparsity_block
from acttail_export.calibration import calibration_ids
from acttail_export.evaluate import load_in_process, load_model, perplexity
from acttail_export.spectra import estimator_alphas
from acttail_export.tuning import COARSE_EPSILONS, REFINE_STEP, tune_block
from acttail_export.weights import resolve_model
from conftest import make_tiny_model, read_block, run_cli

SEQLEN = 48


@pytest.fixture(scope="module")
def tuned(smollm2, wiki_text):
    model = load_in_process(smollm2)
    windows = calibration_ids(smollm2, wiki_text, 1, SEQLEN)
    alphas = estimator_alphas(smollm2, ("mid", "peak"))
    lines = []
    block = tune_block(model, smollm2.projections, alphas, 0.5, windows, text="wiki", log=lines.append)
    return model, windows, alphas, block, lines


def direct_perplexity(model, projections, alphas, windows, trial) -> float:
    modules = allocate(projections, alphas[trial["estimator"]], 0.5, "acttail", trial["epsilon"], trial["sparser"])
    model.set_activation_sparsity(sparsity_block(modules, 0.5, "acttail", trial["estimator"], trial["epsilon"],
                                                 trial["sparser"]))
    return perplexity(model, windows, progress=False)


def test_tuner_chooses_the_lowest_calibration_perplexity(smollm2, tuned):
    model, windows, alphas, block, lines = tuned
    trials = block["tuning"]["trials"]
    chosen = min(trials, key=lambda t: t["perplexity"])
    assert block["tuning"]["chosen"] == chosen
    assert (block["estimator"], block["sparser"], block["epsilon"]) == (chosen["estimator"], chosen["sparser"],
                                                                          chosen["epsilon"])
    # The recorded numbers are what a direct evaluation of the same setting gives.
    worst = max(trials, key=lambda t: t["perplexity"])
    assert worst["perplexity"] > chosen["perplexity"]
    for trial in (chosen, worst):
        assert direct_perplexity(model, smollm2.projections, alphas, windows, trial) == pytest.approx(
            trial["perplexity"], rel=1e-6)


def test_tuner_records_its_search_and_meets_the_budget(smollm2, tuned):
    _, _, alphas, block, lines = tuned
    tuning = block["tuning"]
    assert (tuning["windows"], tuning["seqlen"], tuning["text"]) == (1, SEQLEN, "wiki")
    tried = {(t["estimator"], t["sparser"], t["epsilon"]) for t in tuning["trials"]}
    coarse = {(e, d, eps) for e in ("mid", "peak") for d in ("heavy-tail", "light-tail") for eps in COARSE_EPSILONS}
    assert coarse <= tried and any(eps == 0.0 for _, _, eps in tried)
    coarse_best = min((t for t in tuning["trials"] if (t["estimator"], t["sparser"], t["epsilon"]) in coarse),
                      key=lambda t: t["perplexity"])
    refined = {round(coarse_best["epsilon"] + step, 6) for step in (-REFINE_STEP, REFINE_STEP)}
    assert {eps for e, d, eps in tried if (e, d) == (coarse_best["estimator"], coarse_best["sparser"])} >= {
        eps for eps in refined if 0 < eps <= 1}
    assert len(lines) == len(tuning["trials"]) and all("calibration ppl" in line for line in lines)
    assert abs(block["effective_sparsity"] - 0.5) <= BUDGET_TOLERANCE
    expected = allocate(smollm2.projections, alphas[block["estimator"]], 0.5, "acttail", block["epsilon"], block["sparser"])
    assert {name: spec["keep"] for name, spec in block["modules"].items()} == {n: m.keep for n, m in expected.items()}


def test_mlp_sites_trials_are_the_mlp_allocations(smollm2, tuned):
    """--sites mlp: every trial scores an allocation that leaves attention dense, as the written block does."""
    model, windows, alphas, _, _ = tuned
    applied = []
    apply = model.set_activation_sparsity
    model.set_activation_sparsity = lambda block: (applied.append(block), apply(block))
    try:
        block = tune_block(model, smollm2.projections, {"mid": alphas["mid"]}, 0.5, windows, sparsers=("heavy-tail",),
                           epsilons=(0.3,), sites="mlp", log=lambda line: None)
    finally:
        del model.set_activation_sparsity
    assert block["sites"] == "mlp" and len(applied) == len(block["tuning"]["trials"]) > 1
    for trial in [*applied, block]:
        attention = [spec for name, spec in trial["modules"].items() if ".self_attn." in name]
        assert all(spec["keep"] == spec["in_features"] for spec in attention)
    model.set_activation_sparsity(block)
    assert perplexity(model, windows, progress=False) == pytest.approx(block["tuning"]["chosen"]["perplexity"], rel=1e-6)


def test_export_with_mlp_sites_tunes_on_the_allocations_it_writes(smollm2, wiki_text, tmp_path):
    from acttail_export.pipeline import ExportOptions, export

    options = ExportOptions(sparsity=0.5, allocation="acttail", epsilon="auto", estimator="mid", sparser="heavy-tail",
                            sites="mlp", calibration_windows=1, calibration_seqlen=SEQLEN, link_weights=True)
    result = export(str(smollm2.folder), tmp_path / "auto-mlp", options, log=lambda line: None)
    windows = calibration_ids(smollm2, wiki_text, 1, SEQLEN)  # the export's calibration windows
    # the chosen trial's perplexity is the written checkpoint's on those windows
    written = perplexity(load_in_process(str(result.out)), windows, progress=False)
    assert written == pytest.approx(result.block["tuning"]["chosen"]["perplexity"], rel=1e-6)


def test_trials_the_clip_bounds_cannot_meet_are_skipped(tmp_path):
    # With s_max = target, epsilon 1 gives the highest-score projection sparsity s_min = 0 and no eta can make up for it.
    source = resolve_model(str(make_tiny_model("llama", tmp_path / "tiny")))
    model = load_in_process(source)
    windows = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    lines = []
    block = tune_block(model, source.projections, estimator_alphas(source, ("mid",), use_cache=False), 0.5, windows,
                       sparsers=("heavy-tail",), epsilons=(0.5, 1.0), s_max=0.5, log=lines.append)
    assert 1.0 not in {t["epsilon"] for t in block["tuning"]["trials"]}
    assert any("epsilon 1.000: skipped" in line for line in lines)
    assert abs(block["effective_sparsity"] - 0.5) <= BUDGET_TOLERANCE


def test_cli_epsilon_auto_writes_the_chosen_setting_and_its_search(smollm2, tmp_path):
    out = tmp_path / "auto"
    result = run_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail", "--epsilon", "auto",
                     "--estimator", "mid", "--calibration-windows", "1", "--calibration-seqlen", SEQLEN)
    block = read_block(out)
    tuning = block["tuning"]
    assert {t["estimator"] for t in tuning["trials"]} == {"mid"}  # an explicit --estimator narrows the search
    assert {t["sparser"] for t in tuning["trials"]} == {"heavy-tail", "light-tail"}
    assert tuning["chosen"] == min(tuning["trials"], key=lambda t: t["perplexity"])
    assert (block["estimator"], block["sparser"], block["epsilon"]) == tuple(tuning["chosen"][k] for k in
                                                                               ("estimator", "sparser", "epsilon"))
    assert result.stdout.count("tune: ") == len(tuning["trials"])
    # the alphas are the chosen estimator's, from the spectra an export naming that estimator uses (one precision rule)
    alphas = estimator_alphas(smollm2, (block["estimator"],))[block["estimator"]]
    assert {name: m["alpha"] for name, m in block["modules"].items()} == {n: round(a, 4) for n, a in alphas.items()}
    assert "## Auto-tuning" in (out / "README.md").read_text()
    assert abs(block["effective_sparsity"] - 0.5) <= BUDGET_TOLERANCE
    loaded, _ = load_model(str(out))
    assert loaded.config.activation_sparsity["tuning"] == json.loads(json.dumps(tuning))
