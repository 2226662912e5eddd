"""`acttail-export compare`: its rows are the numbers a user gets from the exported checkpoints, on the same windows."""

import csv

from conftest import run_cli
from test_cli_errors import assert_one_line_failure

WINDOWS = ("--windows", "2", "--seqlen", "128")


def eval_perplexities(checkpoint) -> dict[str, float]:
    """`acttail-export eval CHECKPOINT --dense-baseline` on the compare windows: {"dense": ..., "sparse": ...}."""
    lines = run_cli("eval", checkpoint, "--dense-baseline", *WINDOWS).stdout.strip().splitlines()[1:]
    dense, sparse = (float(line.split()[-1]) for line in lines)
    return {"dense": dense, "sparse": sparse}


def test_compare_rows_match_exported_checkpoints(smollm2, smollm2_50, tmp_path):
    out = tmp_path / "compare"
    result = run_cli("compare", smollm2.folder, "--sparsity", "0.5", "--methods", "dense,uniform,acttail",
                     "--prefill", "sparse,0.5", *WINDOWS, "--out", out)
    assert "prefill sparse = every token of every window" in result.stdout
    with open(out / "compare.csv") as f:
        rows = {(r["method"], r["prefill"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(m, p) for m in ("dense", "uniform", "acttail") for p in ("sparse", "0.5")}
    ppl = {key: float(r["perplexity"]) for key, r in rows.items()}

    # the acttail row is the default export at 50%, evaluated through the shipped modeling code on the same windows
    checkpoint = eval_perplexities(smollm2_50)
    assert abs(ppl["acttail", "sparse"] - checkpoint["sparse"]) <= 1e-3 * checkpoint["sparse"]
    assert abs(ppl["dense", "sparse"] - checkpoint["dense"]) <= 1e-3 * checkpoint["dense"]
    assert ppl["dense", "sparse"] == ppl["dense", "0.5"]
    for method in ("uniform", "acttail"):
        assert abs(float(rows[method, "sparse"]["effective_sparsity"]) - 0.5) <= 0.002
        # sparsity costs perplexity, and keeping the first half of each window dense costs less
        assert ppl["dense", "sparse"] < ppl[method, "0.5"] < ppl[method, "sparse"]

    table = (out / "compare.md").read_text()
    assert "prefill `sparse`" in table and "prefill `0.5`" in table and "| acttail |" in table
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_unknown_method_is_one_line(smollm2, tmp_path):
    result = run_cli("compare", smollm2.folder, "--methods", "dense,magic", "--out", tmp_path / "c", check=False)
    assert_one_line_failure(result, "--methods")
    assert not (tmp_path / "c").exists()
