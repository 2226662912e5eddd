"""Pattern statistics on masks with a known answer, capture against an independent path, and the `patterns` command."""

import csv
import json

import pytest
import torch

from acttail_export.evaluate import load_model, tokenize_windows
from acttail_export.kernels.topk import topk_mask
from acttail_export.patterns import (
    Site,
    capture_masks,
    chance_jaccard,
    cross_window_token_jaccard,
    dense_sites,
    depth_overlap,
    hot_sets,
    jaccard,
    mean_pairwise_jaccard,
    model_sites,
    pattern_rows,
)
from conftest import make_tiny_model, run_cli
from test_cli_errors import assert_one_line_failure


def random_sets(shape: tuple[int, ...], size: int, seed: int) -> torch.Tensor:
    """Independent uniformly random ``size``-subsets of the last dim."""
    return topk_mask(torch.rand(shape, generator=torch.Generator().manual_seed(seed)), size)


def test_identical_sets_give_one_and_disjoint_sets_zero():
    a = random_sets((50, 64), 20, seed=0)
    assert torch.equal(jaccard(a, a), torch.ones(50))
    assert depth_overlap(a, a) == (1.0, 1.0, 1.0)
    first_half = torch.zeros(50, 64, dtype=torch.bool)
    first_half[:, :32] = True
    assert torch.equal(jaccard(first_half, ~first_half), torch.zeros(50))
    assert depth_overlap(first_half, ~first_half) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.8])
def test_independent_random_sets_land_on_chance(density):
    d = 512
    k = round(density * d)
    a, b = random_sets((20000, d), k, seed=1), random_sets((20000, d), k, seed=2)
    assert jaccard(a, b).mean().item() == pytest.approx(chance_jaccard(k, k, d), abs=0.003)
    # different sizes, as between two layers of a checkpoint: chance precision = |L| / d, chance recall = |E| / d
    small = max(k // 2, 1)
    early = random_sets((20000, d), small, seed=3)
    j, precision, recall = depth_overlap(early, b)
    assert j == pytest.approx(chance_jaccard(small, k, d), abs=0.003)
    assert precision == pytest.approx(k / d, abs=0.005) and recall == pytest.approx(small / d, abs=0.005)


def test_cross_window_and_hot_set_overlap_of_random_windows_is_chance():
    d, k = 768, 256
    masks = random_sets((8, 256, d), k, seed=4)
    chance = chance_jaccard(k, k, d)
    assert cross_window_token_jaccard(masks, pairs=20000) == pytest.approx(chance, abs=0.003)
    assert mean_pairwise_jaccard(hot_sets(masks, k)) == pytest.approx(chance, abs=0.02)


def test_cross_window_pairs_never_pair_a_window_with_itself():
    # every window holds one set, disjoint from the others': any same-window pair would score 1
    masks = torch.zeros(3, 10, 30, dtype=torch.bool)
    for w in range(3):
        masks[w, :, 10 * w:10 * w + 10] = True
    assert cross_window_token_jaccard(masks) == 0.0
    assert mean_pairwise_jaccard(hot_sets(masks, 10)) == 0.0
    same = masks[:1].expand(3, -1, -1)
    assert cross_window_token_jaccard(same) == 1.0 and mean_pairwise_jaccard(hot_sets(same, 10)) == 1.0


def test_hot_set_ties_are_random_not_lowest_index():
    # each window's tokens are the d cyclic shifts of one block: every input is active equally often (all counts tie)
    d, k = 600, 200
    base = torch.arange(d) < k
    window = torch.stack([base.roll(shift) for shift in range(d)])
    masks = window.expand(6, -1, -1)
    assert mean_pairwise_jaccard(hot_sets(masks, k)) == pytest.approx(chance_jaccard(k, k, d), abs=0.03)


def test_depth_prediction_with_a_known_number_of_swapped_inputs():
    # layer l+1 = layer l with m of the k active inputs of every token swapped for m inactive ones
    d, k, m = 256, 64, 16
    early = random_sets((500, d), k, seed=5)
    order = torch.rand(500, d, generator=torch.Generator().manual_seed(6))
    leave = topk_mask(torch.where(early, 1 + order, 0.0), m)  # m of the active ones
    enter = topk_mask(torch.where(early, 0.0, 1 + order), m)  # m of the inactive ones
    late = (early & ~leave) | enter
    j, precision, recall = depth_overlap(early, late)
    assert j == pytest.approx((k - m) / (k + m)) and precision == pytest.approx((k - m) / k) == recall
    # nested sets, as the TopK of one vector at two keep counts: the smaller predicts only part of the larger
    x = torch.randn(500, d)
    assert depth_overlap(topk_mask(x, 32), topk_mask(x, 128)) == pytest.approx((32 / 128, 1.0, 32 / 128))


def test_pattern_rows_on_masks_copied_across_depth():
    # random across windows, the same active sets in every layer: token/hot at chance, depth at 1
    d, k = 512, 128
    layer_masks = random_sets((8, 128, d), k, seed=7)
    sites = [Site("mlp_in", "gate", d, {layer: k for layer in range(3)})]
    rows = pattern_rows({"mlp_in": {layer: layer_masks for layer in range(3)}}, sites, max_distance=5)
    by_stat = {}
    for row in rows:
        by_stat.setdefault(row.statistic, []).append(row)
    assert [(r.layer, r.distance) for r in by_stat["depth"]] == [(0, 1), (0, 2), (1, 1)]
    assert all(r.value == pytest.approx(1.0) for stat in ("depth", "depth_precision", "depth_recall") for r in by_stat[stat])
    assert all(r.value == pytest.approx(r.chance, abs=0.02) for r in by_stat["token"] + by_stat["hot"])


def test_capture_matches_the_normed_hidden_states(tmp_path):
    # the attention input of layer l is input_layernorm(hidden state l): an independent path to the same masks
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model("llama", tmp_path / "tiny")).eval()
    ids = torch.randint(256, (3, 16), generator=torch.Generator().manual_seed(8))
    sites = dense_sites(model, 0.7)
    assert [(s.name, s.dim, s.keeps[1]) for s in sites] == [
        ("attn_in", 64, 19), ("o_in", 64, 19), ("mlp_in", 64, 19), ("down_in", 128, 38)]
    masks = capture_masks(model, ids, sites, progress=False)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer, block in enumerate(model.model.layers):
        assert torch.equal(masks["attn_in"][layer], topk_mask(block.input_layernorm(hidden[layer]), 19))
        assert (masks["down_in"][layer].sum(-1) == 38).all()


def test_checkpoint_masks_are_the_dense_models_at_the_checkpoints_keep_counts(smollm2, smollm2_50, wiki_text):
    checkpoint, tokenizer = load_model(str(smollm2_50))
    block = checkpoint.config.activation_sparsity
    sites = model_sites(checkpoint, 0.5)
    assert [s.name for s in sites] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert sites[0].keeps[3] == block["modules"]["model.layers.3.self_attn.q_proj"]["keep"]
    ids = tokenize_windows(tokenizer, wiki_text, 24, 2)
    sparse_off = capture_masks(checkpoint, ids, sites, progress=False)
    dense, _ = load_model(str(smollm2.folder))
    reference = capture_masks(dense, ids, sites, progress=False)
    for site in sites:
        for layer in (1, 15, 29):  # after layer 0 the inputs would differ had the checkpoint stayed sparse
            assert torch.equal(sparse_off[site.name][layer], reference[site.name][layer]), (site.name, layer)


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_on_smollm2_writes_table_csv_and_plot(smollm2, wiki_text, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(wiki_text[:20000])
    out = tmp_path / "patterns"
    result = run_cli("patterns", smollm2.folder, "--text", text, "--windows", 2, "--seqlen", 64, "--max-distance", 2,
                     "--out", out)
    table = result.stdout.splitlines()
    assert "attn_in" in table[1] and "down_in" in table[1] and len(table) == 3 + 30 + 1
    assert (out / "patterns.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(out / "patterns.csv")
    assert len(rows) == 4 * (30 * 2 + (29 + 28) * 3)
    assert all(0 <= float(r["value"]) <= 1 for r in rows)
    # keep = d/2 everywhere: Jaccard chance k/(2d-k) = 1/3, precision and recall chance k/d = 1/2
    assert all(float(r["chance"]) == pytest.approx(0.5 if "_" in r["statistic"] else 1 / 3, abs=1e-6) for r in rows)

    def values(site, statistic, distance="0"):
        picked = [r for r in rows if (r["site"], r["statistic"], r["distance"]) == (site, statistic, distance)]
        return torch.tensor([float(r["value"]) for r in picked]), float(picked[0]["chance"])

    # measured on this text: MLP-input tokens of two windows overlap 0.34-0.36 against 0.333, layer l -> l+1 ~0.6
    token, chance = values("mlp_in", "token")
    assert token.mean() > chance + 0.005
    depth, chance = values("mlp_in", "depth", "1")
    assert depth.mean() > chance + 0.1
    # the d_ff neurons of different layers are unrelated units (any permutation gives the same model): chance
    depth, chance = values("down_in", "depth", "1")
    assert (depth - chance).abs().max() < 0.02


def test_bad_input_is_one_line(tmp_path):
    assert_one_line_failure(run_cli("patterns", "--text", tmp_path / "missing.txt", check=False), "cannot read text file")
    for bad in ("0", "1.5"):
        assert_one_line_failure(run_cli("patterns", "--sparsity", bad, check=False), "--sparsity")
    fake = tmp_path / "ckpt"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"activation_sparsity": {}}))
    assert_one_line_failure(run_cli("patterns", fake, "--sparsity", "0.5", check=False), "--sparsity is for dense models")
