"""Push to the Hub through the real huggingface_hub client, against the loopback Hub of hub_server.py.

Round trip: push the SmolLM2 checkpoint, then a fresh process downloads the repo with transformers, generates, and finds
every file byte-identical. Failures: one stderr line, a non-zero exit, the local checkpoint untouched, and a retry that
works.
"""

import hashlib
import json
import socket
from pathlib import Path

import pytest

from conftest import run_cli, run_fresh_json
from hub_server import READ_TOKEN, WRITE_TOKEN, HubServer
from test_cli_errors import assert_one_line_failure

REPO = "acttail-test/tiny-acttail-50"


@pytest.fixture(autouse=True)
def hub_env(monkeypatch, tmp_path):
    """No real token, login or endpoint leaks in: a fresh HF_HOME per test and a token only where a test sets one."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_ENDPOINT",
                 "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # commits in "regular" mode, which is what the loopback Hub speaks
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # else the client asks huggingface.co for its agent registry


@pytest.fixture
def hub():
    with HubServer() as server:
        yield server


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "tiny-acttail-50"
    run_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail")
    return out


def digests(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def folder_digest(folder: Path) -> dict[str, str]:
    return digests({p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()})


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once the socket is closed


def push(checkpoint, *args, endpoint=None, check=False):
    return run_cli("push", checkpoint, *args, *(["--endpoint", endpoint] if endpoint else []), check=check)


def test_push_then_fresh_process_downloads_and_generates(smollm2_50, hub, tmp_path, monkeypatch):
    repo = "acttail-test/smollm2-acttail-50"
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    result = push(smollm2_50, repo, endpoint=hub.url, check=True)
    assert f"pushed {smollm2_50} to {repo} (main)" in result.stdout
    monkeypatch.delenv("HF_TOKEN")  # the repo is public: the download needs no token
    report = run_fresh_json(f"""
        from huggingface_hub import snapshot_download
        from transformers import AutoModelForCausalLM, AutoTokenizer
        repo = {repo!r}
        tok = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
        report(model_module=type(model).__module__, model_class=type(model).__name__)
        msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
        inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        report(answer=tok.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True),
               snapshot=snapshot_download(repo))
    """, tmp_path, env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub.url})
    # The class comes from the code the fresh process downloaded (transformers_modules), not from acttail_export.
    assert report["model_module"].startswith("transformers_modules.")
    assert report["model_class"] == "ActTailLlamaForCausalLM"
    assert "Paris" in report["answer"]
    snapshot = Path(report["snapshot"])
    assert snapshot.is_relative_to(tmp_path / "hf_home")
    assert folder_digest(snapshot) == folder_digest(smollm2_50)
    assert not hub.unknown


def test_export_push_to_hub(tiny_models, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    out = tmp_path / "out"
    result = run_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail",
                     "--push-to-hub", REPO, "--endpoint", hub.url)
    assert f"pushed {out} to {REPO} (main)" in result.stdout
    assert digests(hub.files(REPO)) == folder_digest(out)
    assert "config.json" in hub.files(REPO) and "modeling_acttail.py" in hub.files(REPO)


@pytest.mark.parametrize("case, token, fault, message", [
    ("no token", None, None, "no Hugging Face token found"),
    ("invalid token", "hf_not_a_token", None, "failed while creating repo acttail-test/tiny-acttail-50: the server answered 401"),
    ("read-only token", READ_TOKEN, None, "the server answered 403"),
    ("server error", WRITE_TOKEN, "commit", "failed while uploading the files: the server answered 500"),
])
def test_failed_push_is_one_line_and_keeps_the_checkpoint(case, token, fault, message, tiny_checkpoint, hub, monkeypatch):
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    if fault:
        hub.faults[fault] = 500
    before = folder_digest(tiny_checkpoint)
    result = push(tiny_checkpoint, REPO, endpoint=hub.url)
    assert_one_line_failure(result, message)
    if token:
        assert f"the local checkpoint at {tiny_checkpoint} is intact; retry with `acttail-export push" in result.stderr
    else:
        assert not hub.requests  # found out before any network call
    assert folder_digest(tiny_checkpoint) == before
    assert hub.repos.get(REPO) is None or not hub.files(REPO)


def test_connection_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    url = closed_port_url()
    result = push(tiny_checkpoint, REPO, endpoint=url)
    assert_one_line_failure(result, f"push to {REPO} at {url} failed while creating repo {REPO}: ConnectError")
    assert "is intact" in result.stderr


@pytest.mark.parametrize("repo_id", ["no-namespace", "org/name/extra", "org/bad--name", "org/", "org/na me"])
def test_bad_repo_id_fails_before_the_network(repo_id, tiny_checkpoint, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert_one_line_failure(push(tiny_checkpoint, repo_id, endpoint=hub.url), f"bad Hub repo id {repo_id!r}")
    assert not hub.requests


def test_not_a_checkpoint_fails_before_the_network(tiny_models, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    result = push(tiny_models["llama"], REPO, endpoint=hub.url)  # a plain model folder: no activation_sparsity block
    assert_one_line_failure(result, "is not an ActTail checkpoint folder")
    assert not hub.requests


def test_export_checks_push_options_before_the_spectra(tiny_models, hub, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail", "--endpoint", hub.url]
    assert_one_line_failure(run_cli(*args, "--push-to-hub", REPO, check=False), "no Hugging Face token found")
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert_one_line_failure(run_cli(*args, "--push-to-hub", "bad--id", check=False), "bad Hub repo id")
    assert_one_line_failure(run_cli(*args, check=False), "go with --push-to-hub")
    assert not out.exists() and not hub.requests


def test_export_push_failure_keeps_out_and_the_retry_works(tiny_models, hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    out = tmp_path / "out"
    hub.faults["commit"] = 500
    result = run_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail",
                     "--push-to-hub", REPO, "--endpoint", hub.url, check=False)
    assert_one_line_failure(result, f"the local checkpoint at {out} is intact; "
                                    f"retry with `acttail-export push {out} {REPO} --endpoint {hub.url}`")
    assert json.loads((out / "config.json").read_text())["activation_sparsity"]["effective_sparsity"] > 0.4
    assert not hub.files(REPO)  # the repo was created, the commit failed
    push(out, REPO, endpoint=hub.url, check=True)  # the retry the message names: create_repo meets a 409
    assert digests(hub.files(REPO)) == folder_digest(out)
    commits = len(hub.repos[REPO].commits)
    push(out, REPO, endpoint=hub.url, check=True)  # the same push once more: nothing changed, no new commit
    assert len(hub.repos[REPO].commits) == commits


def test_private_repo_is_hidden_without_a_token(tiny_checkpoint, hub, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    push(tiny_checkpoint, REPO, "--private", "--commit-message", "tiny at 50%", endpoint=hub.url, check=True)
    assert hub.repos[REPO].private
    assert list(hub.repos[REPO].messages.values()) == ["tiny at 50%"]
    assert HfApi(endpoint=hub.url, token=WRITE_TOKEN).model_info(REPO).private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).model_info(REPO)


def test_revision_lands_on_its_branch_and_hf_endpoint_is_honoured(tiny_checkpoint, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # no --endpoint: huggingface_hub reads it at import
    result = push(tiny_checkpoint, REPO, "--revision", "sparsity-50", check=True)
    assert f"to {REPO} (sparsity-50)" in result.stdout
    assert digests(hub.files(REPO, "sparsity-50")) == folder_digest(tiny_checkpoint)
    assert not hub.files(REPO, "main")
