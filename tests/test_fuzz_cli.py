"""Property-based tests: random bad option values, random sparsity blocks and random file corruptions thrown at the CLI
and the loader. Whatever the input: one line on stderr, a non-zero exit, no traceback, nothing written, the input's files
unchanged. In-process and bounded (each test tens of examples, all failing before a model loads): seconds, not minutes."""

import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from acttail_export.compare import METHODS as COMPARE_METHODS
from acttail_export.modeling.activation_sparsity import validate_activation_sparsity
from conftest import invoke_cli
from test_safety import assert_fails, digest

# The fixtures here (a model, a folder) are reused by every example on purpose: each example must leave them as it found
# them, which is what the tests check.
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# argv cannot hold NUL; surrogates cannot be encoded
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def _is_float(text: str, valid) -> bool:
    try:
        return valid(float(text))
    except ValueError:
        return False


def not_number_in(valid) -> st.SearchStrategy[str]:
    """Text that is not a number for which ``valid`` holds: out-of-range numbers, NaN, inf, words."""
    numbers = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    return st.one_of(numbers, TEXT, st.sampled_from(["nan", "inf", "-inf", "", "0.5.5", "1e400"])).filter(
        lambda text: not _is_float(text, valid))


def not_int_from(low: int) -> st.SearchStrategy[str]:
    """Text that is not an integer >= ``low`` (as int() reads it, underscores and spaces included)."""
    def is_good(text: str) -> bool:
        try:
            return int(text) >= low
        except ValueError:
            return False
    return st.one_of(st.integers(max_value=low - 1).map(str), TEXT, st.floats().map(repr)).filter(
        lambda t: not is_good(t))


def not_one_of(*choices: str) -> st.SearchStrategy[str]:
    return TEXT.filter(lambda text: text not in choices)


# Bad values click or the checks before loading must refuse (exit 2): option -> strategy.
BAD_EXPORT = {
    "--sparsity": not_number_in(lambda s: 0 <= s < 1),
    "--min-sparsity": not_number_in(lambda s: 0 <= s < 1),
    "--max-sparsity": not_number_in(lambda s: 0 <= s < 1),
    "--epsilon": not_number_in(lambda e: 0 <= e <= 1).filter(lambda t: t != "auto"),
    "--prefill": not_number_in(lambda f: 0 < f <= 1).filter(lambda t: t not in ("sparse", "dense")),
    "--greedy-step": not_number_in(lambda s: 0 < s < 1),
    "--calibration-windows": not_int_from(1),
    "--calibration-seqlen": not_int_from(2),
    "--greedy-windows": not_int_from(1),
    "--allocation": not_one_of("acttail", "uniform", "block", "teal-greedy", "calibrated"),
    "--mode": not_one_of("topk", "threshold"),
    "--sites": not_one_of("all", "mlp"),
    "--estimator": not_one_of("mid", "peak", "ks"),
    "--sparser": not_one_of("heavy-tail", "light-tail"),
    "--dtype": not_one_of("float32", "float16", "bfloat16"),
    "--spectra-dtype": not_one_of("auto", "float32", "float64"),
}
# Good values the bad one is mixed with (none of them fails on its own or needs a model loaded first).
GOOD_EXPORT = {
    "--sparsity": st.sampled_from(["0", "0.3", "0.5", "0.9"]),
    "--min-sparsity": st.sampled_from(["0", "0.1"]),
    "--max-sparsity": st.sampled_from(["0.95", "0.99"]),
    "--epsilon": st.sampled_from(["0", "0.3", "1"]),
    "--prefill": st.sampled_from(["sparse", "dense", "0.5", "1"]),
    "--estimator": st.sampled_from(["mid", "peak", "ks"]),
    "--sparser": st.sampled_from(["heavy-tail", "light-tail"]),
}
BAD_OTHER = {
    "eval": {"--seqlen": not_int_from(2), "--windows": not_int_from(1), "--dtype": not_one_of("float32", "float16",
                                                                                               "bfloat16")},
    "patterns": {"--sparsity": not_number_in(lambda s: 0 < s < 1), "--windows": not_int_from(2),
                 "--seqlen": not_int_from(2), "--max-distance": not_int_from(1)},
    "compare": {"--sparsity": TEXT.filter(lambda t: not all(_is_float(v, lambda s: 0 < s < 1) for v in t.split(",")
                                                            if v.strip()) or not t.strip(", ")),
                "--methods": TEXT.filter(lambda t: t.strip(", ") == "" or any(
                    v.strip() not in COMPARE_METHODS for v in t.split(",") if v.strip())),
                "--prefill": not_number_in(lambda f: 0 < f <= 1).filter(lambda t: t not in ("sparse", "dense")
                                                                         and "," not in t),
                "--windows": not_int_from(1), "--seqlen": not_int_from(2)},
    "generate": {"--prompt": st.sampled_from(["", " ", "\n\t"]), "--max-new-tokens": not_int_from(1)},
}


@pytest.fixture
def workspace(tiny_models, tmp_path, monkeypatch):
    """A copy of the tiny model in a folder that is also the working directory (so a default output folder would show)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(tiny_models["llama"], tmp_path / "model")


def assert_untouched(result, workspace: Path, before: dict) -> None:
    """A usage error (exit 2) that left every file in the workspace as it was."""
    assert_fails(result, "", 2)
    assert digest(workspace.parent) == before, "a file was written or changed"


def assert_fails_any(result) -> None:
    assert result.exit_code in (1, 2), (result.exit_code, result.stderr)
    assert_fails(result, "", result.exit_code)


@FUZZ
@given(data=st.data())
def test_bad_export_options(workspace, data):
    bad = data.draw(st.lists(st.sampled_from(sorted(BAD_EXPORT)), min_size=1, max_size=3, unique=True), label="bad")
    good = data.draw(st.lists(st.sampled_from(sorted(set(GOOD_EXPORT) - set(bad))), max_size=4, unique=True))
    options = {name: data.draw(BAD_EXPORT[name], label=name) for name in bad}
    options |= {name: data.draw(GOOD_EXPORT[name], label=name) for name in good}
    options.setdefault("--sparsity", "0.5")
    options.setdefault("--allocation", "acttail")  # no calibration: a check the bad value slips past must show
    before = digest(workspace.parent)
    result = invoke_cli("export", workspace, workspace.parent / "out", *[f"{k}={v}" for k, v in options.items()])
    assert_untouched(result, workspace, before)


@FUZZ
@given(data=st.data(), command=st.sampled_from(sorted(BAD_OTHER)))
def test_bad_options_of_the_other_commands(workspace, data, command):
    name = data.draw(st.sampled_from(sorted(BAD_OTHER[command])), label="option")
    value = data.draw(BAD_OTHER[command][name], label="value")
    before = digest(workspace.parent)
    result = invoke_cli(command, workspace, f"{name}={value}")
    assert_untouched(result, workspace, before)


# Random sparsity blocks: every one is broken in at least one field.

def _valid_block(mode: str) -> dict:
    spec = {"keep": 32, "in_features": 64, "sparsity": 0.5, "alpha": 2.0}
    if mode == "threshold":
        spec["threshold"] = 0.1
    return {"format_version": 1, "method": "acttail", "mode": mode, "prefill": "sparse", "target_sparsity": 0.5,
            "effective_sparsity": 0.5, "modules": {"model.layers.0.mlp.up_proj": spec}}


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


BREAKS = {
    "format_version": JSON.filter(lambda v: v != 1),
    "prefill": JSON.filter(lambda v: v not in ("sparse", "dense") and not (_numeric(v) and 0 < v <= 1)),
    "mode": JSON.filter(lambda v: v not in ("topk", "threshold")),
    "modules": JSON.filter(lambda v: not isinstance(v, dict) or not v),
    "spec": JSON.filter(lambda v: not isinstance(v, dict)),
    # bool keep / in_features pass today's isinstance(int) checks: left to the strict config (issue of the arch branch)
    "keep": JSON.filter(lambda v: not (_numeric(v) and isinstance(v, int) and 1 <= v <= 64) and not isinstance(v, bool)),
    "in_features": JSON.filter(lambda v: not (isinstance(v, int) and v >= 32) and not isinstance(v, bool)),
    "threshold": JSON.filter(lambda v: not (_numeric(v) and math.isfinite(v) and v >= 0)),
}


@st.composite
def broken_blocks(draw) -> dict:
    field = draw(st.sampled_from(sorted(BREAKS)), label="field")
    block = _valid_block("threshold" if field == "threshold" else draw(st.sampled_from(["topk", "threshold"])))
    value = draw(BREAKS[field], label="value")
    spec = block["modules"]["model.layers.0.mlp.up_proj"]
    if field in ("keep", "in_features", "threshold"):
        spec[field] = value
    elif field == "spec":
        block["modules"]["model.layers.0.mlp.up_proj"] = value
    else:
        block[field] = value
    return block


@settings(max_examples=40, deadline=None)
@given(block=broken_blocks())
def test_validation_of_random_blocks(block):
    with pytest.raises(ValueError) as caught:
        validate_activation_sparsity(block)
    assert len(str(caught.value).splitlines()) == 1


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "checkpoint"
    result = invoke_cli("export", tiny_models["llama"], out, "--sparsity", "0.5", "--allocation", "acttail",
                        env={"ACTTAIL_CACHE": str(out.parent / "cache")})
    assert result.exit_code == 0, result.stderr
    return out


@FUZZ
@given(block=st.one_of(broken_blocks(), JSON.filter(lambda v: not isinstance(v, dict))))
def test_loader_refuses_random_blocks_before_loading(checkpoint, block, monkeypatch):
    import acttail_export.evaluate as evaluate

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    config = json.loads((checkpoint / "config.json").read_text())
    original = (checkpoint / "config.json").read_text()
    try:
        (checkpoint / "config.json").write_text(json.dumps({**config, "activation_sparsity": block}))
        before = digest(checkpoint)
        result = invoke_cli("eval", checkpoint, "--seqlen", "16", "--text", evaluate.__file__)
        assert_fails(result, "config.json: activation_sparsity", 1)
        assert digest(checkpoint) == before
    finally:
        (checkpoint / "config.json").write_text(original)


# Random corruptions of the input's files.

def _header(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return size, data[8:8 + size].decode()


@st.composite
def corruptions(draw, model: Path):
    """(description, function that corrupts a copy of ``model``): each one breaks something the export needs."""
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    header_size, header = _header(weights)
    keys = sorted(k for k in json.loads(header) if k != "__metadata__")
    kind = draw(st.sampled_from(["truncate", "header byte", "config bytes", "config field", "delete"]), label="kind")
    if kind == "truncate":
        length = draw(st.integers(0, size - 1), label="length")
        return kind, lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:length])
    if kind == "header byte":  # one byte inside one tensor's entry: its name, dtype, shape or offsets
        key = draw(st.sampled_from(keys), label="tensor")
        start = header.index(f'"{key}":')
        offset = 8 + draw(st.integers(start, header.index("}", start)), label="offset")
        old = weights.read_bytes()[offset]
        byte = draw(st.integers(0, 255).filter(lambda b: b != old), label="byte")

        def flip(m):
            data = bytearray((m / "model.safetensors").read_bytes())
            data[offset] = byte
            (m / "model.safetensors").write_bytes(bytes(data))
        return kind, flip
    if kind == "config bytes":
        content = draw(st.binary(max_size=64), label="content")
        return kind, lambda m: (m / "config.json").write_bytes(content)
    if kind == "config field":
        config = json.loads((model / "config.json").read_text())
        field = draw(st.sampled_from(["model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
                                      "vocab_size", "num_attention_heads", "num_key_value_heads"]), label="field")
        value = draw(JSON.filter(lambda v: v != config[field] and v not in ("mistral",)), label="value")

        def change(m):
            (m / "config.json").write_text(json.dumps({**config, field: value}))
        return kind, change
    name = draw(st.sampled_from(["config.json", "model.safetensors"]), label="file")
    return kind, lambda m: (m / name).unlink()


@FUZZ
@given(data=st.data())
def test_export_of_corrupted_input(tiny_models, data, monkeypatch, tmp_path):
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    _, corrupt = data.draw(corruptions(tiny_models["llama"]))
    with tempfile.TemporaryDirectory(dir=tmp_path) as folder:
        model = shutil.copytree(tiny_models["llama"], Path(folder) / "model")
        corrupt(model)
        before = digest(model)
        result = invoke_cli("export", model, Path(folder) / "out", "--sparsity", "0.5", "--allocation", "acttail")
        assert_fails_any(result)
        assert digest(model) == before
        assert sorted(p.name for p in Path(folder).iterdir()) == ["model"], "something was written"
