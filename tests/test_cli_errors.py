"""Bad input: one clear line on stderr, a non-zero exit, no traceback, and nothing that looks like a checkpoint left behind."""

import json
import shutil

import pytest
import torch

from conftest import invoke_cli, run_cli


def assert_one_line_failure(result, message: str) -> None:
    """``result``: a finished ``run_cli`` process or an ``invoke_cli`` result."""
    assert (result.returncode if hasattr(result, "returncode") else result.exit_code) != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("acttail-export: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def bert_folder(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    return folder


def gpt2_folder(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return folder


def pickle_only(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    return folder


def truncated(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def corrupt_header(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "corrupt")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage-not-json-garbage-not-js"
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def nan_weights(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_model(tiny, tmp_path / "nan")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def no_layers(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "nolayers")
    config = json.loads((folder / "config.json").read_text())
    del config["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def no_config(tiny, tmp_path):
    folder = copy_model(tiny, tmp_path / "noconfig")
    (folder / "config.json").unlink()
    return folder


CASES = {
    "missing path": (lambda tiny, tmp: tmp / "does-not-exist", ["--sparsity", "0.5"], "no such file or folder"),
    "no config": (no_config, ["--sparsity", "0.5"], "has no config.json"),
    "not a causal LM": (lambda tiny, tmp: bert_folder(tmp), ["--sparsity", "0.5"], "supported: llama, mistral, qwen2, qwen3"),
    "unsupported architecture": (lambda tiny, tmp: gpt2_folder(tmp), ["--sparsity", "0.5"], "unsupported architecture 'gpt2'"),
    "sparsity 1": (lambda tiny, tmp: tiny, ["--sparsity", "1.0"], "--sparsity"),
    "sparsity negative": (lambda tiny, tmp: tiny, ["--sparsity", "-0.1"], "--sparsity"),
    "sparsity not a number": (lambda tiny, tmp: tiny, ["--sparsity", "half"], "--sparsity"),
    "pickle-only weights": (pickle_only, ["--sparsity", "0.5"], "safetensors only"),
    "truncated safetensors": (truncated, ["--sparsity", "0.5"], "not a readable safetensors file"),
    "corrupt safetensors": (corrupt_header, ["--sparsity", "0.5"], "not a readable safetensors file"),
    "NaN in a weight": (nan_weights, ["--sparsity", "0.5", "--allocation", "acttail"],  # found by the spectra
                        "model.layers.1.self_attn.q_proj: the weight holds NaN"),
    "no num_hidden_layers": (no_layers, ["--sparsity", "0.5"], "no valid num_hidden_layers"),
    "bad prefill": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--prefill", "2"], "--prefill"),
    "min above target": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--min-sparsity", "0.6"], "--min-sparsity"),
    "unknown mode": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--mode", "magic"], "--mode"),
    "mlp sites cannot reach": (lambda tiny, tmp: tiny, ["--sparsity", "0.8", "--sites", "mlp"],
                               "cannot be reached with --sites mlp"),
    "missing calibration text": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--mode", "threshold",
                                                          "--calibration-text", "/nonexistent/calibration.txt"],
                                 "cannot read text file"),
    "calibration without tokenizer": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "teal-greedy",
                                                                  "--calibration-seqlen", "64"],
                                      "calibration needs the model's tokenizer"),
    "greedy step 0": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--greedy-step", "0"], "--greedy-step"),
    "epsilon not a number": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--epsilon", "wide"], "must be auto or a number"),
    "epsilon above 1": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--epsilon", "1.5"], "must be auto or a number"),
    "epsilon negative": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--epsilon", "-0.1"], "must be auto or a number"),
    "epsilon auto with uniform": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--epsilon", "auto", "--allocation",
                                                           "uniform"], "auto needs --allocation acttail"),
    "missing auto calibration text": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "acttail", "--epsilon",
                                                          "auto", "--calibration-text", "/nonexistent/calibration.txt"],
                                      "cannot read text file"),
    # options that the export asked for would not read: refused, not ignored
    "calibration text without calibration": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "acttail",
                                                                      "--calibration-text", "/nonexistent/text.txt"],
                                             "--calibration-text would be ignored by --allocation acttail --mode topk, "
                                             "which reads no calibration text"),
    "calibration windows without calibration": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "uniform",
                                                                         "--calibration-windows", "8",
                                                                         "--calibration-seqlen", "16"],
                                                "--calibration-windows and --calibration-seqlen would be ignored by "
                                                "--allocation uniform"),
    "greedy step without teal-greedy": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--greedy-step", "0.05"],
                                        "--greedy-step would be ignored by --allocation calibrated: only teal-greedy"),
    "greedy windows without teal-greedy": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "acttail",
                                                                    "--mode", "threshold", "--greedy-windows", "2"],
                                           "--greedy-windows would be ignored by --allocation acttail"),
    "link weights that dtype converts": (lambda tiny, tmp: tiny, ["--sparsity", "0.5", "--allocation", "acttail",
                                                                  "--dtype", "float16", "--link-weights"],
                                         "--link-weights cannot link weights that --dtype converts"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_export_input(case, tiny_models, tmp_path):
    """In this process (the console entry point with its error handling, without 24 interpreter start-ups); the tests
    below run the installed script in a process of its own."""
    make_input, args, message = CASES[case]
    model = make_input(tiny_models["llama"], tmp_path)
    out = tmp_path / "out"
    result = invoke_cli("export", model, out, *args)
    assert_one_line_failure(result, message)
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("command", [["export", "OUT", "--sparsity", "0.5"], ["analyze"]])
def test_gguf_file_without_model_is_refused(command, tmp_path):
    """--gguf-file names a file inside MODEL: without MODEL the embedded model would be read in its place."""
    out = tmp_path / "out"
    result = invoke_cli(*[str(out) if arg == "OUT" else arg for arg in command], "--gguf-file", "other.Q4_0.gguf")
    assert_one_line_failure(result, "--gguf-file other.Q4_0.gguf names a file inside MODEL, and no MODEL was given")
    assert result.exit_code == 2 and not out.exists()


@pytest.mark.parametrize(("args", "cause", "code"), [
    (["--calibration-seqlen", "64"], "calibration needs the model's tokenizer, and", 1),  # the tiny models have none
    ([], "--calibration-seqlen 512 is more than the 128 positions of", 2),
])
def test_default_allocation_on_a_model_it_cannot_calibrate(args, cause, code, tiny_models, tmp_path):
    """The default allocation, calibrated, runs the model on text: where that cannot be done, one line says why and
    names the calibration-free choice (nothing else runs in its place)."""
    out = tmp_path / "out"
    result = invoke_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", *args)
    assert_one_line_failure(result, "; --allocation calibrated (the default) runs the model on calibration text, "
                                    "--allocation acttail needs none")
    assert cause in result.stderr and result.exit_code == code
    assert not out.exists() and "spectra" not in result.stdout  # refused before the spectra


def export_in_process(*args) -> None:
    result = invoke_cli("export", *args)
    assert result.exit_code == 0, result.stderr[-3000:]


def test_existing_out_is_never_replaced_unless_a_previous_export(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me").write_text("user data")
    for overwrite in ([], ["--overwrite"]):
        result = invoke_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail", *overwrite)
        assert_one_line_failure(result, "is not an acttail-export checkpoint (--overwrite replaces only those)")
        assert (out / "keep-me").read_text() == "user data"
    shutil.rmtree(out)
    export_in_process(tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail")
    result = invoke_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail")
    assert_one_line_failure(result, "already exists; pass --overwrite")
    export_in_process(tiny_models["llama"], out, "--sparsity", "0.3", "--allocation", "acttail", "--overwrite")
    assert json.loads((out / "config.json").read_text())["activation_sparsity"]["target_sparsity"] == 0.3


def test_failed_overwrite_keeps_the_old_checkpoint(tiny_models, tmp_path):
    out = tmp_path / "out"
    export_in_process(tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail")
    before = (out / "config.json").read_bytes()
    result = invoke_cli("export", truncated(tiny_models["llama"], tmp_path), out, "--sparsity", "0.3",
                        "--allocation", "acttail", "--overwrite")
    assert_one_line_failure(result, "not a readable safetensors file")
    assert (out / "config.json").read_bytes() == before


def test_unwritable_out_parent(tiny_models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("export", tiny_models["llama"], blocker / "out", "--sparsity", "0.5", "--allocation", "acttail",
                     check=False)
    assert_one_line_failure(result, "a-file")


def test_calibration_windows_beyond_the_positions(tiny_models, tmp_path):
    result = run_cli("export", tiny_models["llama"], tmp_path / "out", "--sparsity", "0.5", "--mode", "threshold",
                     check=False)
    assert_one_line_failure(result, "--calibration-seqlen 512 is more than the 128 positions")
    assert result.returncode == 2


def test_eval_of_missing_text_file(tiny_models, tmp_path):
    result = run_cli("eval", tiny_models["llama"], "--text", tmp_path / "nope.txt", check=False)
    assert_one_line_failure(result, "cannot read text file")


def test_unreachable_hub_id(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("export", "some-org/some-model", tmp_path / "out", "--sparsity", "0.5", check=False, env=env)
    assert_one_line_failure(result, "no local folder 'some-org/some-model', and could not download it from the Hub")
    assert not (tmp_path / "out").exists()
