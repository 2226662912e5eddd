"""`acttail-export compare`: its rows are the numbers a user gets from the exported checkpoints, on the same windows."""

import csv

import pytest

from acttail_export import ExportOptions, export
from conftest import invoke_cli, run_cli
from test_cli_errors import assert_one_line_failure

WINDOWS = ("--windows", "2", "--seqlen", "128")
CALIBRATION_WINDOWS = 1


def eval_perplexities(checkpoint) -> dict[str, float]:
    """`acttail-export eval CHECKPOINT --dense-baseline` on the compare windows: {"dense": ..., "sparse": ...}."""
    result = invoke_cli("eval", checkpoint, "--dense-baseline", *WINDOWS)
    assert result.exit_code == 0, result.stderr
    dense, sparse = (float(line.split()[-1]) for line in result.stdout.strip().splitlines()[1:])
    return {"dense": dense, "sparse": sparse}


def test_compare_rows_match_exported_checkpoints(smollm2, smollm2_50, tmp_path):
    out = tmp_path / "compare"
    result = run_cli("compare", smollm2.folder, "--sparsity", "0.5", "--methods",
                     "dense,uniform,acttail,auto,teal-uniform", "--prefill", "sparse,0.5", *WINDOWS,
                     "--calibration-windows", CALIBRATION_WINDOWS, "--out", out)
    assert "prefill sparse = every token of every window" in result.stdout
    with open(out / "compare.csv") as f:
        rows = {(r["method"], r["prefill"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(m, p) for m in ("dense", "uniform", "acttail", "auto", "teal-uniform")
                         for p in ("sparse", "0.5")}
    ppl = {key: float(r["perplexity"]) for key, r in rows.items()}

    # the acttail row is `export --allocation acttail` at 50%, the auto row `export --allocation acttail --epsilon auto`
    # on the same calibration windows, each evaluated through the shipped modeling code on the same windows
    auto = export(str(smollm2.folder), tmp_path / "auto", ExportOptions(
        sparsity=0.5, allocation="acttail", epsilon="auto", calibration_windows=CALIBRATION_WINDOWS, calibration_seqlen=128,
        link_weights=True))
    # the same search: every trial of compare's auto scored what export's recorded (peak's on float64 spectra in both)
    trials = [f"tune: estimator {t['estimator']:4s} sparser {t['sparser']:10s} epsilon {t['epsilon']:.3f}  "
              f"calibration ppl {t['perplexity']:.3f}" for t in auto.block["tuning"]["trials"]]
    assert [line for line in result.stderr.splitlines() if "calibration ppl" in line] == trials
    assert {t["estimator"] for t in auto.block["tuning"]["trials"]} == {"mid", "peak", "ks"}
    for method, checkpoint in (("acttail", smollm2_50), ("auto", auto.out)):
        measured = eval_perplexities(checkpoint)  # printed to 3 decimals
        assert ppl[method, "sparse"] == pytest.approx(measured["sparse"], abs=5.1e-4), method
        assert ppl["dense", "sparse"] == pytest.approx(measured["dense"], abs=5.1e-4)
    assert ppl["dense", "sparse"] == ppl["dense", "0.5"]
    for method in ("uniform", "acttail", "auto"):
        assert abs(float(rows[method, "sparse"]["effective_sparsity"]) - 0.5) <= 0.002
        # sparsity costs perplexity, and keeping the first half of each window dense costs less
        assert ppl["dense", "sparse"] < ppl[method, "0.5"] < ppl[method, "sparse"]

    # thresholds calibrated on other windows zero about, not exactly, the target on the evaluation windows: the
    # threshold row with every token sparse says how much; TopK rows and partly dense prefills have nothing to add
    measured = float(rows["teal-uniform", "sparse"]["measured_sparsity"])
    assert abs(measured - 0.5) <= 0.05 and measured != 0.5
    assert f"measured {measured:.3f}) prefill sparse" in result.stdout
    assert all(r["measured_sparsity"] == "" for key, r in rows.items() if key != ("teal-uniform", "sparse"))

    table = (out / "compare.md").read_text()
    assert f"(measured {measured:.3f})" in table
    assert "prefill `sparse`" in table and "prefill `0.5`" in table and "| acttail |" in table
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_unknown_method_is_one_line(smollm2, tmp_path):
    result = run_cli("compare", smollm2.folder, "--methods", "dense,magic", "--out", tmp_path / "c", check=False)
    assert_one_line_failure(result, "--methods")
    assert not (tmp_path / "c").exists()


def test_calibration_options_without_a_method_that_calibrates_are_refused(tmp_path):
    result = invoke_cli("compare", "--methods", "dense,uniform", "--calibration-windows", "10", "--out", tmp_path / "c")
    assert_one_line_failure(result, "--calibration-windows would be ignored by --methods dense,uniform: none of them "
                                    "calibrates (those that do: auto, teal-greedy")
    assert not (tmp_path / "c").exists()


def test_windows_of_one_text_that_would_overlap_are_refused(smollm2, wiki_text, tmp_path):
    text = tmp_path / "article.txt"
    text.write_text(wiki_text[:6000])  # about 1300 tokens: 2 x 256 from the start and 4 x 256 from the end overlap
    result = invoke_cli("compare", smollm2.folder, "--methods", "teal-uniform", "--sparsity", "0.5", "--text", text,
                        "--calibration-text", text, "--windows", "2", "--seqlen", "256", "--calibration-windows", "4",
                        "--out", tmp_path / "c")
    assert_one_line_failure(result, f"the evaluation windows (2 x 256 tokens from the start of {text}) and the "
                                    "calibration windows (4 x 256 from its end) would overlap: it has ")
    assert not (tmp_path / "c").exists()


def test_the_overlap_check_is_exact(smollm2, wiki_text):
    """Up to the text's last token the windows pass and are disjoint (the whole text's first and last tokens); one
    window more is refused."""
    from acttail_export.errors import BadOption
    from acttail_export.evaluate import calibration_windows, check_disjoint, load_tokenizer, tokenize_windows

    tokenizer = load_tokenizer(smollm2.folder)
    text, seqlen = wiki_text[:20000], 50
    whole = tokenizer(text)["input_ids"]
    for evaluation in (1, 10, 40):
        calibration = len(whole) // seqlen - evaluation
        check_disjoint(tokenizer, text, (evaluation, seqlen), (calibration, seqlen), "the text")
        assert tokenize_windows(tokenizer, text, seqlen, evaluation).flatten().tolist() == whole[:evaluation * seqlen]
        assert calibration_windows(tokenizer, text, seqlen, calibration).flatten().tolist() == whole[-calibration * seqlen:]
        with pytest.raises(BadOption, match="would overlap"):
            check_disjoint(tokenizer, text, (evaluation, seqlen), (calibration + 1, seqlen), "the text")
