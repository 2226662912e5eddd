"""Decode-step paths of the shipped modeling code on tiny random models (fresh process, no acttail_export): the Triton
kernels (in Triton's interpreter here), the CPU gather path and the reference path agree; selections are shared; the
switches work; torch.compile captures a decode step without graph breaks."""

import pytest

from conftest import run_cli, run_fresh_json

PATHS = """
    import os, torch
    from transformers import AutoModelForCausalLM
    path = {path!r}
    modeling = None
    def load(backend, dtype=torch.float32):
        global modeling
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, sparse_backend=backend, dtype=dtype).eval()
        modeling = __import__(type(model).__module__, fromlist=["x"])
        return model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))  # batch 1: sparse at 50%
    def decode_step(model):
        with torch.inference_mode():
            out = model(ids[:, :-1], use_cache=True)
            return model(ids[:, -1:], past_key_values=out.past_key_values).logits
"""


@pytest.fixture(scope="module")
def tiny_qwen2_50(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "qwen2-50"
    run_cli("export", tiny_models["qwen2"], out, "--sparsity", "0.5", "--allocation", "acttail")
    return out


def test_triton_cpu_and_reference_paths_agree(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    tokens, steps, calls = {}, {}, {}
    for backend in ("reference", "cpu", "triton"):
        model = load(backend)
        model.prepare_sparse_decode()
        real_call = modeling.SparseGroup.__call__
        def counted(group, x):
            calls[backend] = calls.get(backend, 0) + 1
            return real_call(group, x)
        modeling.SparseGroup.__call__ = counted
        steps[backend] = decode_step(model)
        modeling.SparseGroup.__call__ = real_call
        tokens[backend] = model.generate(ids, max_new_tokens=6, do_sample=False)
    report(group_calls={b: calls.get(b, 0) for b in tokens},
           tokens={b: torch.equal(tokens[b], tokens["reference"]) for b in ("cpu", "triton")},
           step={b: (steps[b] - steps["reference"]).abs().max().item() for b in ("cpu", "triton")})
    """, tmp_path)
    # 2 layers x (q/k/v, o, gate/up, down): four group calls per layer, not seven; none on the reference path
    assert report["group_calls"] == {"reference": 0, "cpu": 8, "triton": 8}
    for backend in ("cpu", "triton"):
        assert report["tokens"][backend] is True
        assert report["step"][backend] < 1e-5


def test_triton_group_shares_one_weight_and_batches_fall_back_to_dense(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    model = load("triton")
    attention = model.model.layers[0].self_attn
    before = {name: getattr(attention, name).weight.detach().clone() for name in ("q_proj", "k_proj", "v_proj")}
    model.prepare_sparse_decode()
    group = attention.q_proj.group
    report(one_group=group is attention.k_proj.group is attention.v_proj.group, widths=list(group.widths),
           views=all(getattr(attention, n).weight.untyped_storage().data_ptr() == group.weight_t.untyped_storage().data_ptr()
                     for n in before),
           unchanged=all(torch.equal(getattr(attention, n).weight, w) for n, w in before.items()),
           # rows x kept fraction >= 1: the rows together would read more than one dense pass
           wins=[group.wins(torch.zeros(1, 1, 64)), group.wins(torch.zeros(2, 1, 64)), group.wins(torch.zeros(1, 5, 64))])
    model.to(torch.float64)
    report(moved_group=repr(attention.q_proj.group))
    """, tmp_path)
    assert report["one_group"] is True and report["widths"] == [64, 32, 32]
    assert report["views"] is True and report["unchanged"] is True
    assert report["wins"] == [True, False, False]
    assert report["moved_group"] == "None"


def test_explicit_backend_wins_over_the_environment_which_auto_reads(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    os.environ["ACTTAIL_SPARSE_BACKEND"] = "reference"
    paths = {}
    for backend in ("auto", "cpu"):
        model = load(backend)
        model.prepare_sparse_decode()
        paths[backend] = sorted({m.group.path if m.group else "reference" for m in model.topk_modules().values()})
    report(paths=paths)
    """, tmp_path)
    assert report["paths"]["auto"] == ["reference"]
    assert report["paths"]["cpu"] == ["cpu"]


def test_unavailable_backend_warns_once_and_runs_the_reference_path(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    import logging
    warnings = []
    catcher = logging.Handler()
    catcher.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger().addHandler(catcher)
    model = load("triton")  # no GPU and no interpreter: Triton cannot run on CPU tensors
    model.prepare_sparse_decode()
    model.set_sparse_backend("triton")
    model.prepare_sparse_decode()
    report(paths=sorted({m.group.path if m.group else "reference" for m in model.topk_modules().values()}),
           warnings=[w for w in warnings if "sparse_backend" in w])
    """, tmp_path, env={"TRITON_INTERPRET": "0"})
    assert report["paths"] == ["reference"]
    assert report["warnings"] == ["sparse_backend='triton' cannot run here (cpu torch.float32): decode steps use the reference path"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_cpu_path_matches_the_reference_path(dtype, tiny_qwen2_50, tmp_path):
    """bfloat16 / float16 on CPU take the CPU path ("auto" picks it) and decode as the reference path does: a decode
    step's logits within half-precision rounding, and the same greedy tokens."""
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + f"""
    steps, tokens = {{}}, {{}}
    for backend in ("reference", "auto"):
        model = load(backend, dtype=torch.{dtype})
        model.prepare_sparse_decode()
        report(**{{backend: sorted({{m.group.path if m.group else "reference" for m in model.topk_modules().values()}})}})
        steps[backend] = decode_step(model).float()
        tokens[backend] = model.generate(ids, max_new_tokens=6, do_sample=False)
    report(step=((steps["auto"] - steps["reference"]).abs().max() / steps["reference"].abs().max()).item(),
           same_tokens=torch.equal(tokens["auto"], tokens["reference"]))
    """, tmp_path)
    assert report["reference"] == ["reference"] and report["auto"] == ["cpu"]
    assert report["step"] < 0.02  # bf16 keeps 8 bits: the two paths round different partial sums
    assert report["same_tokens"] is True


def test_layout_changes_only_in_prepare_never_in_forward(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    model = load("cpu")
    decode_step(model)
    up = model.model.layers[0].mlp.up_proj
    report(group=repr(up.group), stride=list(up.weight.stride()))
    """, tmp_path)
    assert report["group"] == "None"
    assert report["stride"] == [64, 1]


def test_bad_backend_is_refused_as_argument_and_in_the_environment(tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    try:
        load("cuda-magic")
    except ValueError as error:
        report(argument=str(error))
    model = load("auto")
    os.environ["ACTTAIL_SPARSE_BACKEND"] = "CPU"
    try:
        model.prepare_sparse_decode()
    except ValueError as error:
        report(environment=str(error))
    """, tmp_path)
    assert "sparse_backend must be one of" in report["argument"]
    assert report["environment"] == ("the environment variable ACTTAIL_SPARSE_BACKEND must be one of ('auto', "
                                     "'triton', 'cpu', 'reference'), got 'CPU'")


def test_save_pretrained_after_sparse_decode_saves_what_was_loaded(tiny_qwen2_50, tmp_path):
    """A planned decode keeps each projection's weight and bias as views of its group's input-major layout (the CPU
    and Triton paths alike); saving gives them back as transformers writes them, and the saved model decodes as the
    original."""
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + f"""
    from safetensors.torch import load_file
    model = load("cpu")
    before = model.generate(ids, max_new_tokens=6, do_sample=False)  # plans the sparse decode
    planned = model.model.layers[0].self_attn.q_proj.group is not None
    model.save_pretrained({str(tmp_path / "saved")!r})
    original, saved = load_file(path + "/model.safetensors"), load_file({str(tmp_path / "saved")!r} + "/model.safetensors")
    after = model.generate(ids, max_new_tokens=6, do_sample=False)
    reloaded = AutoModelForCausalLM.from_pretrained({str(tmp_path / "saved")!r}, trust_remote_code=True).eval()
    report(planned=planned, same_names=sorted(saved) == sorted(original),
           same_values=all(torch.equal(saved[n], original[n]) for n in original),
           replanned=model.model.layers[0].self_attn.q_proj.group is not None,
           same_tokens=[torch.equal(after, before),
                        torch.equal(reloaded.generate(ids, max_new_tokens=6, do_sample=False), before)])
    """, tmp_path)
    assert report == {"planned": True, "same_names": True, "same_values": True, "replanned": True,
                      "same_tokens": [True, True]}


def test_weights_and_biases_loaded_in_place_reach_a_planned_decode(tiny_qwen2_50, tmp_path):
    """``load_state_dict`` copies into the parameters in place: the group's layout (weights and Qwen2's q/k/v biases,
    shared by the CPU and Triton paths) sees the new values, and the decode step equals the reference path's."""
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    model, reference = load("cpu"), load("reference")
    model.prepare_sparse_decode()
    state = {n: t * 1.5 + 0.25 if n.endswith(("bias", "proj.weight")) else t for n, t in model.state_dict().items()}
    model.load_state_dict(state)
    reference.load_state_dict(state)
    model.prepare_sparse_decode()  # still current: the same storage
    report(current=model.model.layers[0].self_attn.q_proj.group.is_current(),
           step=(decode_step(model) - decode_step(reference)).abs().max().item())
    """, tmp_path)
    assert report["current"] is True
    assert report["step"] < 1e-4


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_decode_step_has_no_graph_break(backend, tiny_qwen2_50, tmp_path):
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + f"""
    from transformers import StaticCache
    model = load({backend!r})
    model.prepare_sparse_decode()
    eager = decode_step(model)
    report(planned=sorted({{m.group.path for m in model.topk_modules().values() if m.group}}))
    cache = StaticCache(config=model.config, max_cache_len=16)
    def step(tokens, position):
        return model(tokens, past_key_values=cache, cache_position=position, use_cache=True).logits
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.inference_mode():
        step(ids[:, :-1], torch.arange(11))
        logits = compiled(ids[:, -1:], torch.tensor([11]))
    report(compiled_vs_eager=(logits - eager).abs().max().item())
    """, tmp_path)
    assert report["planned"] == [backend]
    assert report["compiled_vs_eager"] < 1e-5


def test_threshold_groups_autotune_on_steps_that_keep_their_planned_share():
    """prepare_sparse_decode autotunes the Triton GEMV on a random step; with a calibrated threshold (small next to
    unit Gaussians) that step must still keep about the planned share, since the best tile depends on it."""
    import torch

    from acttail_export.modeling.modeling_acttail import SparseGroup, TopKLinear

    torch.manual_seed(0)
    for keep, threshold in ((1024, 0.03), (3584, 0.5)):  # 25% and 87.5% of 4096 inputs kept
        member = TopKLinear.from_linear(torch.nn.Linear(4096, 8), keep=keep, prefill="sparse", threshold=threshold)
        x = SparseGroup([member], "cpu").typical_step(4)
        assert x.shape == (4, 1, 4096) and x.dtype == member.weight.dtype
        assert abs(float((x.abs() > threshold).float().mean()) - keep / 4096) < 0.02


@pytest.mark.parametrize("prefill", ["sparse", "dense", 0.5])
@pytest.mark.parametrize("keep, threshold", [(16, None), (16, 0.0), (4, None), (4, 0.5)])
def test_every_prefill_policy_passes_the_input_itself_exactly_where_the_projection_is_dense(prefill, keep, threshold):
    """A projection that keeps all its inputs gets x itself at every policy and length (no copy: a copy can land at
    another alignment and change the dense GEMM's rounding, so compare's dense rows would differ by policy)."""
    import torch

    from acttail_export.modeling.modeling_acttail import TopKLinear

    member = TopKLinear.from_linear(torch.nn.Linear(16, 8), keep=keep, prefill=prefill, threshold=threshold)
    for tokens in (1, 2, 9):
        x = torch.randn(1, tokens, 16)
        x[..., 0] = 0.1  # below the threshold: a sparse member zeroes it
        kept = member.sparsify(x)
        assert (kept is x) == (not member.sparse or (prefill == "dense" and tokens > 1))
        assert torch.equal(kept, x) == (kept is x)


def test_planned_decode_serves_only_the_steps_it_was_planned_for(tiny_qwen2_50, tmp_path):
    """Weights replaced after planning (``load_state_dict(assign=True)``, ``p.data = ...``), counts set on a member
    directly and steps in another dtype (CPU autocast) take the reference path until ``prepare_sparse_decode`` plans
    again: before, they read the planned layout's old weights or counts, or its bits as the wrong dtype (a crash on
    the direct GEMV, garbage on the bags)."""
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    model, reference = load("cpu"), load("reference")
    model.prepare_sparse_decode()
    state = {n: t * 1.5 + 0.25 if n.endswith(("bias", "proj.weight")) else t for n, t in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    reference.load_state_dict(state)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.data = reference.model.layers[1].mlp.down_proj.weight.data * 0.5
        reference.model.layers[1].mlp.down_proj.weight.data *= 0.5
    stale = (decode_step(model) - decode_step(reference)).abs().max().item()
    model.prepare_sparse_decode()
    replanned = model.model.layers[1].mlp.down_proj.group.is_current()
    fresh = load("cpu")
    fresh.prepare_sparse_decode()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = [torch.equal(fresh.generate(ids, max_new_tokens=4, do_sample=False),
                                load("reference").generate(ids, max_new_tokens=4, do_sample=False))]
    step = (decode_step(model) - decode_step(reference)).abs().max().item()
    for m in (model, reference):  # a count set on a member directly, not through set_activation_sparsity
        m.model.layers[0].self_attn.k_proj.keep //= 2
    report(stale=stale, replanned=replanned, autocast=autocast, step=step,
           recounted_current=model.model.layers[0].self_attn.k_proj.group.is_current(),
           recounted=(decode_step(model) - decode_step(reference)).abs().max().item())
    """, tmp_path)
    assert report["stale"] < 1e-4
    assert report["recounted_current"] is False and report["recounted"] < 1e-4
    assert report["replanned"] is True and report["step"] < 1e-4
    assert report["autocast"] == [True]


def test_threads_decoding_through_one_model_keep_their_own_outputs(tiny_qwen2_50, tmp_path):
    """A planned group's pre-hook leaves q/k/v (gate/up) their outputs for the step; two threads decoding through one
    model (a threaded server) each take their own."""
    report = run_fresh_json(PATHS.format(path=str(tiny_qwen2_50)) + """
    import threading
    torch.set_num_threads(1)
    model = load("cpu")
    model.prepare_sparse_decode()
    inputs = [torch.randint(0, 256, (1, 1), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    with torch.inference_mode():
        expected = [model(x).logits for x in inputs]
    wrong = [0, 0]
    def decode(t):
        with torch.inference_mode():
            for _ in range(300):
                wrong[t] += not torch.allclose(model(inputs[t]).logits, expected[t], atol=1e-6)
    threads = [threading.Thread(target=decode, args=(t,)) for t in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report(wrong=wrong, planned=model.model.layers[0].mlp.gate_proj.group is not None)
    """, tmp_path)
    assert report == {"wrong": [0, 0], "planned": True}
