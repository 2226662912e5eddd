"""Decode-step paths of the shipped modeling code on tiny random models (fresh process, no acttail_export): the Triton
kernels (in Triton's interpreter here), the CPU gather path and the reference path agree; selections are shared; the
switches work; torch.compile captures a decode step without graph breaks."""

import pytest

from conftest import run_cli, run_fresh_python

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
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    def decode_step(model):
        with torch.inference_mode():
            out = model(ids[:, :-1], use_cache=True)
            return model(ids[:, -1:], past_key_values=out.past_key_values).logits
"""


@pytest.fixture(scope="module")
def tiny_qwen2_50(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("decode") / "qwen2-50"
    run_cli("export", tiny_models["qwen2"], out, "--sparsity", "0.5")
    return out


def test_triton_cpu_and_reference_paths_agree(tiny_qwen2_50, tmp_path):
    out = run_fresh_python(PATHS.format(path=str(tiny_qwen2_50)) + """
    calls = {}
    tokens, steps = {}, {}
    for backend in ("reference", "cpu", "triton"):
        model = load(backend)
        if backend == "reference":  # the module is loaded once: count its selections from here on
            for name, (select, gemv) in list(modeling.DECODE_PATHS.items()):
                def counted(rows, ks, select=select, name=name):
                    calls[name] = calls.get(name, 0) + 1
                    return select(rows, ks)
                modeling.DECODE_PATHS[name] = (counted, gemv)
        calls.clear()
        steps[backend] = decode_step(model)
        print("SELECTIONS", backend, calls.get(backend, 0))
        tokens[backend] = model.generate(ids, max_new_tokens=6, do_sample=False)
    for backend in ("cpu", "triton"):
        print("TOKENS", backend, torch.equal(tokens[backend], tokens["reference"]))
        print("STEP", backend, (steps[backend] - steps["reference"]).abs().max().item())
    """, tmp_path)
    # 2 layers x (q/k/v, o, gate/up, down): four selections per layer, not seven
    assert "SELECTIONS reference 0" in out and "SELECTIONS cpu 8" in out and "SELECTIONS triton 8" in out
    for backend in ("cpu", "triton"):
        assert f"TOKENS {backend} True" in out
        assert float(out.split(f"STEP {backend} ")[1].split()[0]) < 1e-5


def test_environment_forces_the_reference_path(tiny_qwen2_50, tmp_path):
    out = run_fresh_python(PATHS.format(path=str(tiny_qwen2_50)) + """
    os.environ["ACTTAIL_SPARSE_BACKEND"] = "reference"
    model = load("auto")
    seen = []
    modeling.DECODE_PATHS["cpu"] = (lambda *a: seen.append(1), None)
    decode_step(model)
    print("CPU_CALLS", len(seen), "INPUT_MAJOR", model.model.layers[0].mlp.up_proj.is_input_major())
    """, tmp_path)
    assert "CPU_CALLS 0 INPUT_MAJOR False" in out


def test_bad_backend_is_refused(tiny_qwen2_50, tmp_path):
    out = run_fresh_python(PATHS.format(path=str(tiny_qwen2_50)) + """
    try:
        load("cuda-magic")
    except ValueError as error:
        print("REFUSED", error)
    """, tmp_path)
    assert "REFUSED sparse_backend must be one of" in out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_compiled_decode_step_has_no_graph_break(backend, tiny_qwen2_50, tmp_path):
    out = run_fresh_python(PATHS.format(path=str(tiny_qwen2_50)) + f"""
    from transformers import StaticCache
    model = load({backend!r})
    model.prepare_sparse_decode()
    eager = decode_step(model)
    cache = StaticCache(config=model.config, max_cache_len=16)
    def step(tokens, position):
        return model(tokens, past_key_values=cache, cache_position=position, use_cache=True).logits
    compiled = torch.compile(step, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch.inference_mode():
        step(ids[:, :-1], torch.arange(11))
        logits = compiled(ids[:, -1:], torch.tensor([11]))
    print("COMPILED_VS_EAGER", (logits - eager).abs().max().item())
    """, tmp_path)
    assert float(out.split("COMPILED_VS_EAGER ")[1].split()[0]) < 1e-5
