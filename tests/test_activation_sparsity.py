"""The activation_sparsity block as a strict dataclass, checked on its own and against the model it is applied to, and the
one matcher of projection names every part of the package reads projection identity from."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from acttail_export.allocation import allocate
from acttail_export.card import _by_kind
from acttail_export.checkpoint import sparsity_block
from acttail_export.errors import ExportError
from acttail_export.evaluate import dense_block, load_in_process
from acttail_export.modeling.activation_sparsity import (ActivationSparsity, sparse_prompt_tokens,
                                                         validate_activation_sparsity)
from acttail_export.modeling.projections import INPUTS, PROJECTION_KINDS, PROJECTION_PATHS, parse_projection
from acttail_export.weights import resolve_model
from conftest import make_tiny_model, read_block, run_cli, run_fresh_json

Q0 = "model.layers.0.self_attn.q_proj"
DOWN1 = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama's source, the same model built in-process, and a 50% uniform block from the exporter's functions."""
    source = resolve_model(str(make_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama")))
    modules = allocate(source.projections, {p.name: 2.0 for p in source.projections}, 0.5, "uniform")
    return source, load_in_process(source), sparsity_block(modules, 0.5, "uniform", "mid", 0.0, "heavy-tail")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama exported at 50% by the CLI: a format_version 1 checkpoint as users have them."""
    tiny_model = make_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama")
    out = tmp_path_factory.mktemp("export") / "ckpt"
    run_cli("export", tiny_model, out, "--sparsity", "0.5", "--allocation", "acttail")
    return out


def assert_refused(apply, *words: str) -> None:
    """``apply()`` raises ValueError with one line that contains every one of ``words``."""
    with pytest.raises(ValueError) as info:
        apply()
    message = str(info.value)
    assert "\n" not in message and all(word in message for word in words), message


# ---------------------------------------------------------------------------------------------------------- the matcher

@pytest.mark.parametrize(("name", "parsed"), [
    (Q0, (0, "q")),
    ("model.layers.12.self_attn.o_proj", (12, "o")),
    ("model.layers.3.mlp.gate_proj", (3, "gate")),
    (DOWN1, (1, "down")),
    ("lm_head", None),
    ("model.embed_tokens", None),
    ("model.layers.0.input_layernorm", None),
    ("model.layers.0.mlp.q_proj", None),  # a q_proj belongs to self_attn
    ("model.layers.0.self_attn.up_proj", None),
    ("model.layers.x.mlp.up_proj", None),
    ("model.layers.0.mlp.up_proj.weight", None),
    (None, None),
])
def test_parse_projection(name, parsed):
    assert parse_projection(name) == parsed
    if parsed:
        layer, kind = parsed
        assert f"model.layers.{layer}.{PROJECTION_PATHS[kind]}" == name  # the inverse


def test_input_groups_cover_every_kind_once():
    assert sorted(kind for kinds in INPUTS.values() for kind in kinds) == sorted(PROJECTION_KINDS)
    assert [kinds for kinds in INPUTS.values() if len(kinds) > 1] == [("q", "k", "v"), ("gate", "up")]  # shared inputs


def test_every_consumer_sees_the_same_projections(tiny):
    source, model, block = tiny
    names = {name for name, _ in model.named_modules() if parse_projection(name)}
    assert {p.name for p in source.projections} == names == set(block["modules"])
    assert all((p.layer, p.kind) == parse_projection(p.name) for p in source.projections)
    from acttail_export.patterns import _projection_modules, checkpoint_sites, dense_sites

    assert set(_projection_modules(model)) == {parse_projection(name) for name in names}
    assert [s.projection for s in dense_sites(model, 0.5)] == ["q", "o", "gate", "down"]
    assert [s.name for s in checkpoint_sites(block)] == [f"{kind}_proj" for kind in PROJECTION_KINDS]
    modules = allocate(source.projections, {p.name: 2.0 for p in source.projections}, 0.5, "uniform")
    assert list(_by_kind(modules)) == list(PROJECTION_KINDS)


def test_bench_decode_builds_a_uniform_block_from_a_model(tiny):
    # it used to name kinds "q_proj", which no site matched: the budget share was 0 and allocation divided by it
    spec = importlib.util.spec_from_file_location("bench_decode", Path(__file__).parents[1] / "benchmarks" / "bench_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, model, _ = tiny
    block = bench.uniform_block(model, 0.5)
    assert abs(block["effective_sparsity"] - 0.5) <= 0.002 and len(block["modules"]) == 14


# ---------------------------------------------------------------------------------------------- the block on its own

def edited(block: dict, edit) -> dict:
    block = copy.deepcopy(block)
    edit(block)
    return block


@pytest.mark.parametrize(("edit", "words"), [
    (lambda b: b.update(colour="blue"), ["activation_sparsity: unknown key 'colour'"]),
    (lambda b: b["modules"][Q0].update(bias=1), [f"modules[{Q0!r}]: unknown key 'bias'"]),
    (lambda b: b["modules"][Q0].pop("keep"), [f"modules[{Q0!r}]: missing key 'keep'"]),
    (lambda b: b.update(format_version=2), ["format_version is 2", "version 1"]),
    (lambda b: b.update(format_version=True), ["format_version is True"]),
    (lambda b: b.update(modules={}), ["activation_sparsity.modules must map"]),
    (lambda b: b["modules"].update(lm_head={"keep": 32, "in_features": 64}), ["modules['lm_head']", "not a q/k/v/o"]),
    (lambda b: b["modules"].update({"model.embed_tokens": {"keep": 1, "in_features": 1}}), ["modules['model.embed_tokens']"]),
    (lambda b: b["modules"][Q0].update(keep=0), [f"modules[{Q0!r}].keep", "keep=0", "in_features=64"]),
    (lambda b: b["modules"][Q0].update(keep=65, sparsity=None), [f"modules[{Q0!r}].keep", "keep=65"]),
    (lambda b: b["modules"][Q0].update(keep=True), [f"modules[{Q0!r}].keep", "keep=True"]),
    (lambda b: b["modules"][Q0].update(keep=32.0), [f"modules[{Q0!r}].keep", "keep=32.0"]),
    (lambda b: b["modules"][Q0].update(in_features="64"), [f"modules[{Q0!r}].in_features", "'64'"]),
    (lambda b: b["modules"][Q0].update(keep=40), [f"modules[{Q0!r}].sparsity is 0.5", "keep 40 of 64"]),
    (lambda b: b["modules"][Q0].update(alpha="big"), [f"modules[{Q0!r}].alpha"]),
    (lambda b: b.update(mode="magic"), ["activation_sparsity.mode must be one of"]),
    (lambda b: b.update(mode="threshold"), [f"modules[{Q0!r}].threshold", "got None"]),
    (lambda b: b.update(sites="mlp"), [f"modules[{Q0!r}].keep is 32", "sites 'mlp' leaves q dense"]),
    (lambda b: b.update(sites=["all"]), ["activation_sparsity.sites must be one of"]),
    (lambda b: b.update(prefill=1.5), ["activation_sparsity.prefill"]),
    (lambda b: b.update(target_sparsity=-0.1), ["activation_sparsity.target_sparsity"]),
    (lambda b: b.update(epsilon="auto"), ["activation_sparsity.epsilon"]),
    (lambda b: b.update(estimator=3), ["activation_sparsity.estimator must be a string"]),
    (lambda b: b.update(tuning=[1]), ["activation_sparsity.tuning must be a dict"]),
])
def test_bad_block_is_refused_in_one_line_naming_the_field(tiny, edit, words):
    _, model, block = tiny
    bad = edited(block, edit)
    assert_refused(lambda: ActivationSparsity.from_dict(bad), *words)
    assert_refused(lambda: validate_activation_sparsity(bad), *words)  # the one-line wrapper the loader tests call
    assert_refused(lambda: model.set_activation_sparsity(bad), *words)


@pytest.mark.parametrize("bad", [None, [], "block", 1, {"modules": {Q0: {"keep": 1, "in_features": 1}}},
                                 {"format_version": 1, "modules": []}, {"format_version": 1, "modules": {Q0: 7}},
                                 {"format_version": 1, "modules": {1: {"keep": 1, "in_features": 1}}}])
def test_garbage_is_a_value_error(bad):
    assert_refused(lambda: validate_activation_sparsity(bad), "activation_sparsity")


# ------------------------------------------------------------------------------------------------ the block vs the model

@pytest.mark.parametrize(("edit", "words"), [
    (lambda b: b.update(modules={Q0: b["modules"][Q0]}),
     ["activation_sparsity.modules lists 1 of the model's 14 projections", "missing 'model.layers.0.self_attn.k_proj'"]),
    (lambda b: b["modules"].pop(DOWN1), ["lists 13 of the model's 14", f"missing {DOWN1!r}"]),
    (lambda b: b["modules"].update({"model.layers.7.mlp.up_proj": {"keep": 1, "in_features": 64}}),
     ["modules['model.layers.7.mlp.up_proj']: this model has no such projection"]),
    (lambda b: b["modules"][Q0].update(in_features=128, keep=64),
     [f"modules[{Q0!r}].in_features is 128", "has 64"]),
    (lambda b: b.update(effective_sparsity=0.4), ["activation_sparsity.effective_sparsity is 0.4", "keeps give 0.5"]),
])
def test_block_that_does_not_fit_the_model_is_refused(tiny, edit, words):
    _, model, block = tiny
    bad = edited(block, edit)
    ActivationSparsity.from_dict(bad)  # fine on its own: only the model shows what is wrong
    before = {name: m.keep for name, m in model.topk_modules().items()}
    assert_refused(lambda: model.set_activation_sparsity(bad), *words)
    assert {name: m.keep for name, m in model.topk_modules().items()} == before  # nothing half-applied


BAD_CHECKPOINTS = {
    "unknown key": (lambda b: b.update(colour="blue"), "activation_sparsity: unknown key 'colour'"),
    "one projection": (lambda b: b.update(modules={Q0: b["modules"][Q0]}),
                       "activation_sparsity.modules lists 1 of the model's 14 projections"),
    "lm_head": (lambda b: b["modules"].update(lm_head={"keep": 32, "in_features": 64}),
                "activation_sparsity.modules['lm_head']: not a q/k/v/o/gate/up/down projection"),
}


@pytest.fixture(scope="module")
def bad_checkpoints(exported, tmp_path_factory) -> dict[str, Path]:
    """Copies of the exported checkpoint whose config.json holds an edited block, by edit."""
    folders = {}
    for what, (edit, _) in BAD_CHECKPOINTS.items():
        folder = tmp_path_factory.mktemp("bad") / what.replace(" ", "_")
        folder.mkdir()
        for file in exported.iterdir():
            if file.is_file():
                (folder / file.name).write_bytes(file.read_bytes())
        config = json.loads((exported / "config.json").read_text())
        edit(config["activation_sparsity"])
        (folder / "config.json").write_text(json.dumps(config))
        folders[what] = folder
    return folders


@pytest.mark.parametrize("what", list(BAD_CHECKPOINTS))
def test_checkpoint_with_a_bad_block_is_refused_at_load_in_process(bad_checkpoints, what):
    with pytest.raises(ExportError) as info:  # from the config's or the model's ValueError
        load_in_process(str(bad_checkpoints[what]))
    assert "\n" not in str(info.value) and BAD_CHECKPOINTS[what][1] in str(info.value)


def test_checkpoint_with_a_bad_block_is_refused_by_its_shipped_code(bad_checkpoints, tmp_path):
    # the user's path: transformers runs the flat copy of the runtime shipped in the checkpoint
    folders = {what: str(folder) for what, folder in bad_checkpoints.items()}
    report = run_fresh_json(f"""
        from transformers import AutoModelForCausalLM
        errors = {{}}  # None: it loaded
        for what, folder in {folders!r}.items():
            try:
                AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
                errors[what] = None
            except ValueError as e:
                errors[what] = str(e)
        report(errors=errors)
    """, tmp_path)
    for what, (_, message) in BAD_CHECKPOINTS.items():
        error = report["errors"][what]
        assert error is not None and message in error and "\n" not in error, (what, error)


# --------------------------------------------------------------------------------------------------- what keeps loading

def test_a_real_export_loads_and_round_trips_exactly(exported, tiny):
    block = read_block(exported)
    assert block["format_version"] == 1
    assert ActivationSparsity.from_dict(block).to_dict() == block  # nothing the exporter writes is lost or reordered
    assert list(ActivationSparsity.from_dict(block).to_dict()) == list(block)
    loaded = load_in_process(str(exported))
    assert loaded.config.activation_sparsity == block
    assert {n: m.keep for n, m in loaded.topk_modules().items()} == {n: s["keep"] for n, s in block["modules"].items()}


def test_blocks_written_before_mode_and_sites_existed_still_load(exported, tiny):
    _, model, _ = tiny
    block = read_block(exported)
    old = {key: value for key, value in block.items() if key not in ("mode", "sites")}
    model.set_activation_sparsity(old)
    assert model.config.activation_sparsity == {**old, "mode": "topk", "sites": "all"}
    assert all(m.threshold is None and m.prefill == "sparse" for m in model.topk_modules().values())


def test_threshold_mode_and_dense_copies(tiny):
    source, model, _ = tiny
    modules = allocate(source.projections, {p.name: 2.0 for p in source.projections}, 0.5, "uniform", sites="mlp")
    thresholds = {name: 0.25 for name in modules}
    block = sparsity_block(modules, 0.5, "uniform", "mid", 0.0, "heavy-tail", mode="threshold", sites="mlp",
                           thresholds=thresholds)
    model.set_activation_sparsity(block)
    assert model.get_submodule(DOWN1).threshold == 0.25 and model.get_submodule(Q0).keep == 64
    dense = dense_block(block)
    assert dense["effective_sparsity"] == 0.0
    assert all(s["keep"] == s["in_features"] and s["threshold"] == 0.0 for s in dense["modules"].values())
    model.set_activation_sparsity(dense)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    base = load_in_process(source)
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_a_fraction_sparsifies_the_ceiling_of_its_share_of_the_prompt_exactly():
    """f as written, not as a float product: 0.07 of 100 tokens is 7 (float arithmetic makes it 7.000000000000001)."""
    for hundredths in range(1, 101):
        for tokens in (1, 7, 100, 333, 4096):
            assert sparse_prompt_tokens(hundredths / 100, tokens) == -(-hundredths * tokens // 100), (hundredths, tokens)
    assert sparse_prompt_tokens(1, 5) == 5 and sparse_prompt_tokens(0.5, 3) == 2
