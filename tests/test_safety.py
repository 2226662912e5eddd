"""No data loss, no foreign code: what --overwrite may replace, the one-path export, auto_map checks, --link-weights,
complete inputs, kill signals, and the checks eval / generate / patterns / compare make before a model loads.

In-process (``invoke_cli``) on tiny random models: the whole file runs in seconds."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import acttail_export.checkpoint as checkpoint
from acttail_export.trust import foreign_code
from conftest import invoke_cli, make_tiny_model, run_cli


def assert_fails(result, message: str, code: int) -> None:
    """One line on stderr naming ``message``, exit ``code``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("acttail-export: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def digest(folder) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def env(tmp_path):
    return {"ACTTAIL_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def text(tmp_path):
    """A small text file, so that no test pays for extracting the bundled Wikipedia text into its fresh cache."""
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return ["--text", str(path)]


@pytest.fixture
def tiny(tiny_models, tmp_path):
    """A private copy of the tiny llama, in its own folder ``models/llama`` beside a sibling ``models/other``."""
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "notes.txt").write_text("the user's")
    return shutil.copytree(tiny_models["llama"], tmp_path / "models" / "llama")


@pytest.fixture
def exported(tiny, tmp_path, env):
    out = tmp_path / "export"
    result = invoke_cli("export", tiny, out, "--sparsity", "0.5", "--allocation", "acttail", env=env)
    assert result.exit_code == 0, result.stderr
    return out


# --overwrite and the one-path form


def test_overwrite_never_replaces_a_folder_holding_the_input(tiny, tmp_path, env):
    before = digest(tmp_path / "models")
    result = invoke_cli("export", tiny, tmp_path / "models", "--sparsity", "0.5", "--overwrite", env=env)
    assert_fails(result, "is or holds the input model", 1)
    assert digest(tmp_path / "models") == before


def test_overwrite_never_replaces_the_input(tiny, env):
    (tiny / "extra.txt").write_text("the user's")
    before = digest(tiny)
    result = invoke_cli("export", tiny, tiny, "--sparsity", "0.5", "--overwrite", env=env)
    assert_fails(result, "is or holds the input model", 1)
    assert digest(tiny) == before


def test_out_inside_the_input_is_refused(tiny, env):
    before = digest(tiny)
    result = invoke_cli("export", tiny, tiny / "out", "--sparsity", "0.5", env=env)
    assert_fails(result, "lies inside the input model", 1)
    assert digest(tiny) == before and not (tiny / "out").exists()


def test_overwrite_refuses_a_folder_that_is_not_an_export(tiny, tmp_path, env):
    out = tmp_path / "models" / "other"
    result = invoke_cli("export", tiny, out, "--sparsity", "0.5", "--overwrite", env=env)
    assert_fails(result, "is not an acttail-export checkpoint (--overwrite replaces only those)", 1)
    assert (out / "notes.txt").read_text() == "the user's"


def test_overwrite_replaces_a_previous_export(tiny, exported, env):
    before = json.loads((exported / "config.json").read_text())["activation_sparsity"]["target_sparsity"]
    assert invoke_cli("export", tiny, exported, "--sparsity", "0.5", env=env).exit_code == 1  # no --overwrite
    result = invoke_cli("export", tiny, exported, "--sparsity", "0.3", "--allocation", "acttail", "--overwrite", env=env)
    assert result.exit_code == 0, result.stderr
    after = json.loads((exported / "config.json").read_text())["activation_sparsity"]["target_sparsity"]
    assert (before, after) == (0.5, 0.3)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_one_path_that_is_a_model_is_refused(tiny, overwrite, env):
    """``export mylm --sparsity 0.5`` (MODEL forgotten) must not export the default model over mylm."""
    before = digest(tiny)
    result = invoke_cli("export", tiny, "--sparsity", "0.5", *overwrite, env=env)
    assert_fails(result, f"To export it: acttail-export export {tiny} OUT", 2)
    assert digest(tiny) == before


def test_every_export_names_the_model_it_read(tiny, tmp_path, env):
    result = invoke_cli("export", tiny, tmp_path / "out", "--sparsity", "0.5", "--allocation", "acttail", env=env)
    assert result.stdout.splitlines()[0] == f"model: {tiny}"


# Foreign code


def add_marker_module(folder, name: str, marker) -> None:
    """A module that proves it ran: importing it writes ``marker``."""
    (folder / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Evil: pass\n")


def set_auto_map(folder, file: str, auto_map: dict) -> None:
    path = folder / file
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["auto_map"] = {**data.get("auto_map", {}), **auto_map}
    path.write_text(json.dumps(data))


FOREIGN = {
    "model class in another file": ("config.json", {"AutoModelForCausalLM": "evil.Evil"}, "evil.Evil"),
    "config class in another file": ("config.json", {"AutoConfig": "evil.Evil"}, "evil.Evil"),
    "tokenizer in another file": ("tokenizer_config.json", {"AutoTokenizer": ["evil.Evil", None]}, "evil.Evil"),
    "tokenizer named by config.json": ("config.json", {"AutoTokenizer": [None, "evil.Evil"]}, "evil.Evil"),
    "a class from another Hub repo": ("config.json", {"AutoModelForCausalLM": "someone/repo--modeling_acttail.X"},
                                      "someone/repo--modeling_acttail.X"),
    "another class of our file": ("config.json", {"AutoModelForCausalLM": "modeling_acttail.torch"},
                                  "modeling_acttail.torch"),
}


@pytest.mark.parametrize("case", list(FOREIGN))
def test_foreign_auto_map_is_found(case, exported, tmp_path):
    file, auto_map, named = FOREIGN[case]
    assert foreign_code(exported) is None
    add_marker_module(exported, "evil", tmp_path / "marker")
    set_auto_map(exported, file, auto_map)
    assert f"names {named!r}, which is not acttail-export's code" in foreign_code(exported)


def test_our_file_modified_is_foreign(exported, tmp_path):
    with open(exported / "modeling_acttail.py", "a") as f:
        f.write(f"\nopen({str(tmp_path / 'marker')!r}, 'w').write('ran')\n")
    assert foreign_code(exported) == "its modeling_acttail.py differs from acttail-export's"
    (exported / "topk.py").unlink()  # a helper our modeling file imports
    shutil.copyfile(checkpoint.shipped_code_files()[0].parent / "modeling_acttail.py", exported / "modeling_acttail.py")
    assert foreign_code(exported) == "its topk.py differs from acttail-export's"


@pytest.mark.parametrize("command", [["eval", "--seqlen", "16"], ["generate"], ["patterns", "--seqlen", "16"]])
def test_foreign_code_never_runs_without_the_flag(command, exported, tmp_path, env, text):
    add_marker_module(exported, "evil", tmp_path / "marker")
    set_auto_map(exported, "tokenizer_config.json", {"AutoTokenizer": ["evil.Evil", None]})
    before = digest(exported)
    result = invoke_cli(command[0], exported, *command[1:], *(text if command[0] != "generate" else []), env=env)
    assert_fails(result, "which is not acttail-export's code; pass --trust-remote-code to run it", 1)
    assert not (tmp_path / "marker").exists()
    assert digest(exported) == before


@pytest.mark.parametrize("command", [["export", "OUT", "--sparsity", "0.5"],
                                     ["compare", "--methods", "dense", "--text", "TEXT"]])
def test_input_that_ships_its_own_code_is_refused(command, tiny, tmp_path, env, text):
    add_marker_module(tiny, "evil", tmp_path / "marker")
    set_auto_map(tiny, "tokenizer_config.json", {"AutoTokenizer": ["evil.Evil", None]})
    before = digest(tiny)
    args = [{"OUT": str(tmp_path / "out"), "TEXT": text[1]}.get(a, a) for a in command]
    result = invoke_cli(args[0], tiny, *args[1:], env=env)
    assert_fails(result, "the model ships its own code, which acttail-export does not run", 1)
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out").exists()
    assert digest(tiny) == before


# --link-weights


def test_link_weights_is_a_hard_link(tiny, tmp_path, env):
    result = invoke_cli("export", tiny, tmp_path / "out", "--sparsity", "0.5", "--allocation", "acttail", "--link-weights",
                        env=env)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").stat().st_ino == (tiny / "model.safetensors").stat().st_ino
    assert "copied the weights instead" not in result.stdout


def test_link_weights_across_filesystems_copies_and_says_so(tiny, tmp_path, env, monkeypatch):
    def cross_device(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), src, None, dst)

    monkeypatch.setattr(checkpoint.os, "link", cross_device)
    out = tmp_path / "out"
    result = invoke_cli("export", tiny, out, "--sparsity", "0.5", "--allocation", "acttail", "--link-weights", env=env)
    assert result.exit_code == 0, result.stderr
    weights = out / "model.safetensors"
    assert not weights.is_symlink() and weights.stat().st_ino != (tiny / "model.safetensors").stat().st_ino
    assert weights.read_bytes() == (tiny / "model.safetensors").read_bytes()
    notes = [line for line in result.stdout.splitlines() if "copied the weights instead" in line]
    assert len(notes) == 1 and "Invalid cross-device link" in notes[0]


# Completeness


@pytest.mark.parametrize("drop, message", [
    (["model.embed_tokens.weight", "model.norm.weight"], "lacks the tensor model.embed_tokens.weight that llama needs"),
    (["model.norm.weight"], "lacks the tensor model.norm.weight"),
    (["lm_head.weight"], "lacks the tensor lm_head.weight"),  # untied: the head is its own tensor
])
def test_input_missing_tensors_is_refused(drop, message, tiny, tmp_path, env):
    tensors = load_file(tiny / "model.safetensors")
    for key in drop:
        del tensors[key]
    save_file(tensors, tiny / "model.safetensors", metadata={"format": "pt"})
    result = invoke_cli("export", tiny, tmp_path / "out", "--sparsity", "0.5", env=env)
    assert_fails(result, message, 1)
    assert not (tmp_path / "out").exists()


def test_input_tensor_of_the_wrong_shape_is_refused(tiny, tmp_path, env):
    tensors = load_file(tiny / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:32].clone()
    save_file(tensors, tiny / "model.safetensors", metadata={"format": "pt"})
    result = invoke_cli("export", tiny, tmp_path / "out", "--sparsity", "0.5", env=env)
    assert_fails(result, "tensor model.norm.weight has shape [32], the config needs [64]", 1)


def test_tied_embeddings_need_no_head(tmp_path, env):
    model = make_tiny_model("llama", tmp_path / "tied", tie_word_embeddings=True)
    result = invoke_cli("export", model, tmp_path / "out", "--sparsity", "0.5", "--allocation", "acttail", env=env)
    assert result.exit_code == 0, result.stderr


# Kill signals and stale temporary folders


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_kill_during_the_copy_keeps_the_old_checkpoint(signum, tiny, exported, env, monkeypatch):
    before = digest(exported)
    copy = checkpoint._copy_weights

    def copy_then_killed(*args, **kwargs):
        copy(*args, **kwargs)
        os.kill(os.getpid(), signum)  # the handler raises here, mid-export, as a `kill` from outside would

    monkeypatch.setattr(checkpoint, "_copy_weights", copy_then_killed)
    handler = signal.getsignal(signum)
    result = invoke_cli("export", tiny, exported, "--sparsity", "0.3", "--allocation", "acttail", "--overwrite", env=env)
    assert_fails(result, f"interrupted by {signal.Signals(signum).name}", 128 + signum)
    assert signal.getsignal(signum) is handler  # restored for whoever called main()
    assert digest(exported) == before
    assert sorted(p.name for p in exported.parent.iterdir() if p.name.startswith(".export")) == []


def test_stale_partial_of_a_dead_export_is_removed(tiny, tmp_path, env):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (dead.pid, alive.pid):
            (tmp_path / f".out.partial-{pid}").mkdir()
            (tmp_path / f".out.partial-{pid}" / "model.safetensors").write_bytes(b"half")
        result = invoke_cli("export", tiny, tmp_path / "out", "--sparsity", "0.5", "--allocation", "acttail", env=env)
        assert result.exit_code == 0, result.stderr
        assert not (tmp_path / f".out.partial-{dead.pid}").exists()
        assert (tmp_path / f".out.partial-{alive.pid}" / "model.safetensors").read_bytes() == b"half"
    finally:
        alive.kill()
        alive.wait()


def test_export_killed_between_its_renames_is_undone(tiny, tmp_path, env):
    """SIGKILL between moving OUT aside and putting the new one in place leaves ``.OUT.old-PID``: the next export puts
    the old checkpoint back (and, without --overwrite, refuses to replace it); after the second rename only the old
    folder is left, and the next export removes it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out, old = tmp_path / "out", tmp_path / f".out.old-{dead.pid}"
    export = ("export", tiny, out, "--sparsity", "0.5", "--allocation", "acttail")
    assert invoke_cli(*export, env=env).exit_code == 0
    before = digest(out)
    out.rename(old)  # killed after the first rename
    result = invoke_cli(*export, env=env)
    assert_fails(result, "already exists; pass --overwrite to replace it", 1)
    assert f"restored {out} from {old.name}" in result.stdout
    assert digest(out) == before and not old.exists()
    shutil.copytree(out, old)  # killed after the second rename
    result = invoke_cli(*export, "--overwrite", env=env)
    assert result.exit_code == 0, result.stderr
    assert f"removed {old.name}" in result.stdout and not old.exists() and (out / "model.safetensors").is_file()


# Checks before a model loads


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the checks must come first."""
    import acttail_export.cli as cli

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the check")

    monkeypatch.setattr(cli, "load_model", load_model)
    monkeypatch.setattr(cli, "load_in_process", load_model)


@pytest.mark.parametrize("command", [["eval"], ["patterns"], ["compare", "--methods", "dense"]])
def test_seqlen_beyond_the_positions_is_refused(command, tiny, no_loading, env, text):
    command = [text[1] if a == "TEXT" else a for a in command]
    result = invoke_cli(command[0], tiny, *command[1:], *text, "--seqlen", "129", env=env)
    assert_fails(result, "--seqlen 129 is more than the 128 positions of", 2)


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b" \n\t\n", "is empty"),
                                              (b"ab\x00cd", "is not a text file"), (b"\xff\xfe\x00", "cannot read")])
@pytest.mark.parametrize("command", ["eval", "patterns", "compare"])
def test_empty_or_binary_text_is_refused_before_loading(command, content, message, tiny, tmp_path, no_loading, env):
    text = tmp_path / "text.txt"
    text.write_bytes(content)
    result = invoke_cli(command, tiny, "--text", text, env=env)
    assert_fails(result, message, 1)


@pytest.mark.parametrize("prompt", ["", "   "])
@pytest.mark.parametrize("raw", [[], ["--raw"]])
def test_empty_prompt_is_refused(prompt, raw, tiny, no_loading):
    result = invoke_cli("generate", tiny, "--prompt", prompt, *raw)
    assert_fails(result, "the prompt is empty", 2)


def test_broken_sparsity_block_is_refused_before_loading(exported, env, text):
    config = json.loads((exported / "config.json").read_text())
    config["activation_sparsity"]["prefill"] = 7
    (exported / "config.json").write_text(json.dumps(config))
    result = invoke_cli("eval", exported, "--seqlen", "16", *text, env=env)
    assert_fails(result, "activation_sparsity.prefill must be one of", 1)


# Exit codes, usage and help


@pytest.mark.parametrize("args", [
    ["--sparsity", "nan"], ["--sparsity", "1.5"], ["--sparsity", "0.5", "--min-sparsity", "nan"],
    ["--sparsity", "0.5", "--min-sparsity", "0.6"], ["--sparsity", "0.5", "--epsilon", "nan"],
    ["--sparsity", "0.5", "--greedy-step", "nan"], ["--sparsity", "0.5", "--prefill", "nan"],
    ["--sparsity", "0.5", "--push-to-hub", "not a repo id"],
])
def test_bad_option_values_exit_2(args, tiny, tmp_path, env):
    result = invoke_cli("export", tiny, tmp_path / "out", *args, env=env)
    assert_fails(result, "", 2)
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_sparsity_is_a_usage_error(exported, env):
    assert_fails(invoke_cli("patterns", exported, "--sparsity", "0.5", env=env), "--sparsity is for dense models", 2)


def test_no_arguments_prints_the_usage():
    result = invoke_cli()
    assert result.exit_code == 2 and result.stderr == ""
    assert result.stdout.startswith("Usage: acttail-export [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in result.stdout


def test_every_option_has_help():
    import click

    from acttail_export.cli import cli

    missing = [f"{name} {p.opts[0]}" for name, command in cli.commands.items() for p in command.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_no_progress_bars_in_a_pipe(exported, text):
    """transformers' "Loading weights" bar stays off the stderr of a pipe, like the tool's own bars (a real process:
    transformers reads the setting when it is imported). The tiny model has no tokenizer: eval fails just after the
    weights loaded, and that one line is all stderr holds."""
    result = run_cli("eval", exported, "--seqlen", "16", "--windows", "1", *text, check=False)
    assert result.stderr.startswith("acttail-export: error: could not load") and len(result.stderr.splitlines()) == 1
