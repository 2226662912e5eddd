"""An export that cannot finish (bad shards, lying headers, no room, no permission, Ctrl-C) ends with one clear line and
leaves no checkpoint, half-written or otherwise, behind."""

import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import time

import pytest
import torch

from conftest import CLI, make_tiny_model, run_cli
from test_cli_errors import assert_one_line_failure


def assert_nothing_written(out) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*")), "a partial checkpoint was left behind"


def test_shard_missing_from_disk(tmp_path):
    model = make_tiny_model("llama", tmp_path / "sharded")
    torch.manual_seed(0)
    # re-save in shards: 2 layers of a 64-wide model in ~100 KB pieces
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model).save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    (tmp_path / "shards" / shards[1]).unlink()
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "shards", out, "--sparsity", "0.5", "--allocation", "acttail", check=False)
    assert_one_line_failure(result, f"lists shards that are missing: {shards[1]}")
    assert_nothing_written(out)


def lying_header(src, dst, change) -> None:
    """Copy the model in ``src`` to ``dst`` with ``change`` applied to its safetensors header (same header length)."""
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    change(header["model.layers.1.mlp.down_proj.weight"])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    (dst / "model.safetensors").write_bytes(data[:8] + text.ljust(size) + data[8 + size:])


@pytest.mark.parametrize("lie", ["shape", "offsets"])
def test_header_that_lies_about_sizes(lie, tiny_models, tmp_path):
    def change(entry):
        if lie == "shape":  # twice the elements its byte range holds
            entry["shape"] = [entry["shape"][0], 2 * entry["shape"][1]]
        else:  # a byte range past the end of the file
            entry["data_offsets"][1] += 4096

    lying_header(tiny_models["llama"], tmp_path / "liar", change)
    out = tmp_path / "out"
    result = run_cli("export", tmp_path / "liar", out, "--sparsity", "0.5", "--allocation", "acttail", check=False)
    assert_one_line_failure(result, "liar/model.safetensors is not a readable safetensors file")
    assert_nothing_written(out)


def test_disk_full_while_writing(tiny_models, tmp_path):
    """A file size limit makes every write past 64 KB fail as a full disk would (Python ignores SIGXFSZ, so the write
    returns EFBIG); the weights (430 KB) cannot be written."""
    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([CLI, "export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail"],
                            capture_output=True, text=True, env=env, preexec_fn=limit_file_size, stdin=subprocess.DEVNULL)
    assert_one_line_failure(result, f"no space left to write {out}")
    assert_nothing_written(out)


def test_permission_denied_on_out(tiny_models, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    if os.geteuid() == 0:  # root ignores mode bits; the immutable attribute stops root too
        if subprocess.run(["chattr", "+i", parent], capture_output=True).returncode != 0:
            pytest.skip("running as root and chattr +i is not permitted here: no way to deny a write")
    try:
        result = run_cli("export", tiny_models["llama"], parent / "out", "--sparsity", "0.5", "--allocation", "acttail",
                         check=False)
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", parent], check=True)
        parent.chmod(0o755)
    assert_one_line_failure(result, str(parent / "out"))
    assert "permission" in result.stderr.lower() or "not permitted" in result.stderr.lower()
    assert list(parent.iterdir()) == []


def default_sigint() -> None:
    """A shell that starts the suite in the background ignores SIGINT, and an ignored signal stays ignored across exec:
    Python then installs no KeyboardInterrupt handler. Restore the default so the child sees Ctrl-C as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_spectra(smollm2, tmp_path):
    """SIGINT (what Ctrl-C sends) once the spectra have started: exit 130, one line, no checkpoint, no cache file."""
    out = tmp_path / "out"
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([CLI, "export", smollm2.folder, out, "--sparsity", "0.5", "--allocation", "acttail",
                                "--spectra-dtype", "float64"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               stdin=subprocess.DEVNULL, preexec_fn=default_sigint)
    assert process.stdout.readline() == f"model: {smollm2.folder}\n"
    first_line = process.stdout.readline()
    assert first_line.startswith("spectra: 210 projections"), first_line
    time.sleep(1.0)  # inside the eigenvalue loop (210 projections in float64 take well over a second)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert "spectra: done" not in stdout, "the spectra finished before the interrupt: the test did not test anything"
    assert process.returncode == 130
    assert stderr.strip() == "acttail-export: error: interrupted"
    assert_nothing_written(out)
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_spectra_cache_is_reused_and_invalidated_and_weights_linked(tiny_models, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], model)
    env = {**os.environ, "ACTTAIL_CACHE": str(tmp_path / "cache")}

    def export(out, *args):
        result = run_cli("export", model, tmp_path / out, "--sparsity", "0.5", "--allocation", "acttail", *args, env=env)
        return result.stdout, json.loads((tmp_path / out / "config.json").read_text())["activation_sparsity"]

    first, block = export("a")
    assert "spectra: 14 projections on cpu" in first
    second, again = export("b", "--link-weights")
    assert "spectra: reusing" in second and again == block
    assert (tmp_path / "b" / "model.safetensors").stat().st_ino == (model / "model.safetensors").stat().st_ino
    other, _ = export("c", "--sparsity", "0.7", "--epsilon", "0.5")  # another setting, same spectra
    assert "spectra: reusing" in other
    os.utime(model / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))  # the weights changed
    changed, _ = export("d")
    assert "spectra: 14 projections on cpu" in changed
