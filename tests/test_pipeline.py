"""`acttail_export.export` is the one export path: the CLI writes what it writes, and `analyze` prints the alphas it writes."""

import hashlib
import json

import pytest

from acttail_export import ExportOptions, export
from acttail_export.errors import BadOption
from conftest import invoke_cli, read_block
from test_cli_errors import assert_one_line_failure


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("args, options", [
    (["--allocation", "acttail"], {"allocation": "acttail"}),  # every other option at its default
    (["--allocation", "acttail", "--estimator", "peak", "--epsilon", "0.5", "--sparser", "light-tail", "--min-sparsity",
      "0.1"], {"allocation": "acttail", "estimator": "peak", "epsilon": 0.5, "sparser": "light-tail", "min_sparsity": 0.1}),
    (["--allocation", "block", "--prefill", "0.5", "--spectra-dtype", "float64"],
     {"allocation": "block", "prefill": 0.5, "spectra_dtype": "float64"}),
])
def test_library_export_writes_what_the_cli_writes(args, options, tiny_models, tmp_path, monkeypatch):
    model = tiny_models["qwen2"]
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    cli = invoke_cli("export", model, tmp_path / "cli", "--sparsity", "0.6", *args)
    assert cli.exit_code == 0, cli.stderr
    lines = []
    result = export(str(model), tmp_path / "lib", ExportOptions(sparsity=0.6, **options), log=lines.append)

    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert json.loads((tmp_path / "lib" / "config.json").read_text()) == config
    assert result.block == config["activation_sparsity"] and result.out == tmp_path / "lib"
    assert {name: m.keep for name, m in result.modules.items()} == {n: m["keep"] for n, m in result.block["modules"].items()}
    for file in result.source.weight_files:
        assert digest(tmp_path / "lib" / file.name) == digest(tmp_path / "cli" / file.name) == digest(file)
    # the CLI prints the library's lines (the input, the spectra), then its summary
    assert lines[0] == f"model: {model}" and lines[1].startswith("spectra: ")
    assert cli.stdout.startswith(f"model: {model}\nspectra: ")
    assert f"effective sparsity {config['activation_sparsity']['effective_sparsity']:.4f} (target 0.6); wrote " in cli.stdout
    assert "acttail_export.export(" in (tmp_path / "lib" / "README.md").read_text()


@pytest.mark.parametrize("options, message", [
    ({"epsilon": "auto", "allocation": "uniform"}, "--epsilon auto needs --allocation acttail --mode topk"),
    ({"min_sparsity": 0.7}, "--min-sparsity"),
    ({"estimator": "median"}, "unknown estimator 'median'; choose from mid, peak, ks"),
    ({"dtype": "int8"}, "unknown dtype 'int8'"),
])
def test_bad_options_are_refused_before_the_input_is_read(options, message, tmp_path):
    lines = []
    with pytest.raises(BadOption, match=message):
        export(str(tmp_path / "no-such-model"), tmp_path / "out", ExportOptions(sparsity=0.5, **options),
               log=lines.append)
    assert not lines and not (tmp_path / "out").exists()


@pytest.mark.parametrize("estimator", ["mid", "peak"])
def test_analyze_prints_the_alphas_export_writes(estimator, smollm2, tmp_path):
    out = tmp_path / estimator
    result = invoke_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail", "--estimator",
                        estimator, "--link-weights")
    assert result.exit_code == 0, result.stderr
    written = {name: m["alpha"] for name, m in read_block(out)["modules"].items()}

    analyze = invoke_cli("analyze", smollm2.folder)
    assert analyze.exit_code == 0, analyze.stderr
    assert "mid from float32, peak from float64, ks from float32 spectra" in analyze.stdout
    lines = analyze.stdout.splitlines()
    column = lines[1].split().index(estimator)
    printed = {line.split()[0]: float(line.split()[column]) for line in lines[2:]}
    assert printed.keys() == written.keys() and len(printed) == 210
    assert all(printed[name] == pytest.approx(alpha, rel=1e-4) for name, alpha in written.items())


@pytest.mark.parametrize("same_text", ["default", "a copy"])
def test_eval_refuses_calibration_windows_that_overlap_its_windows(same_text, smollm2, wiki_text, tmp_path):
    """--eval measures 8 x 512 tokens from the start of the bundled text: calibration windows of that text (by default,
    or a copy of it) reaching into them are refused before any work."""
    from acttail_export.evaluate import load_tokenizer

    total = len(load_tokenizer(smollm2.folder)(wiki_text)["input_ids"])
    windows = total // 8192  # as many windows of the model's 8192 positions as the text holds
    assert total - windows * 8192 < 8 * 512  # so they reach into the evaluation windows
    copy = tmp_path / "wiki.txt"
    copy.write_text(wiki_text, encoding="utf-8")
    text = [] if same_text == "default" else ["--calibration-text", copy]
    out = tmp_path / "out"
    result = invoke_cli("export", smollm2.folder, out, "--sparsity", "0.5", "--mode", "threshold", "--eval", *text,
                        "--calibration-windows", windows, "--calibration-seqlen", 8192)
    assert_one_line_failure(result, f"the evaluation windows (8 x 512 tokens from the start of the bundled Wikipedia "
                                    f"text) and the calibration windows ({windows} x 8192 from its end) would overlap")
    assert not out.exists()
