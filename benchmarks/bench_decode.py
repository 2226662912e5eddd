"""End-to-end decode speed (tokens/s, batch 1, greedy) of an ActTail model against the same model dense.

    python benchmarks/bench_decode.py --device cuda               # 7B-shaped Llama, random bf16 weights, built on the GPU
    python benchmarks/bench_decode.py --device cpu                # SmolLM2-135M fp32, exported by the CLI at each sparsity

Every row runs one model object; ``set_activation_sparsity`` swaps the per-projection k (dense = every k = d_in, the same
``F.linear`` as the base model, weights in their checkpoint layout: the dense rows run first). Modes:
- ``generate``: plain ``model.generate`` with the dynamic cache; tokens/s = new tokens / (time of the run - time of a run
  that stops after the first token, i.e. the prefill);
- ``forward``: the decode steps driven directly (forward + argmax, dynamic cache), as a serving loop runs them;
- ``compiled`` (CUDA): a static KV cache and the decode step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
  the gpt-fast recipe.
Each sparse row also reports how far one decode step's logits are from the reference path (TopK mask + dense matmul).
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from acttail_export.allocation import allocate
from acttail_export.checkpoint import sparsity_block
from acttail_export.evaluate import dense_block
from acttail_export.modeling.projections import parse_projection
from acttail_export.weights import Projection


def projections_of(model) -> list[Projection]:
    return [Projection(name, *parsed, m.out_features, m.in_features, Path("-"))
            for name, m in model.named_modules() if (parsed := parse_projection(name))]


def uniform_block(model, sparsity: float) -> dict:
    """A uniform block: on random weights every alpha is alike, and speed depends on the bytes read, which the budget sets."""
    projections = projections_of(model)
    modules = allocate(projections, {p.name: 0.0 for p in projections}, sparsity, method="uniform")
    return sparsity_block(modules, sparsity, "uniform", "mid", 0.0, "heavy-tail")


def synthetic_7b(layers: int):
    from acttail_export.modeling.configuration_acttail import ActTailLlamaConfig
    from acttail_export.modeling.modeling_acttail import ActTailLlamaForCausalLM

    config = ActTailLlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = ActTailLlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model.eval()


def saved_blocks(sparsities: list[float], folder: Path) -> dict[float, dict] | None:
    """The ``activation_sparsity`` block of every export ``folder / s{sparsity}`` made by :func:`smollm2_exports`
    before (``--exports``), or None when any is missing."""
    configs = [folder / f"s{s}" / "config.json" for s in sparsities]
    if not all(config.exists() for config in configs):
        return None
    return {s: json.loads(config.read_text())["activation_sparsity"] for s, config in zip(sparsities, configs)}


def smollm2_exports(sparsities: list[float], folder: Path, mode: str = "topk",
                    model: Path | None = None) -> tuple[Path, dict[float, dict]]:
    """Export SmolLM2 (or the model folder ``model``) at each sparsity with the CLI (ActTail allocation; TopK, or
    calibrated thresholds); return the first checkpoint and every block."""
    cli = str(Path(sys.executable).parent / "acttail-export")
    blocks = {}
    for sparsity in sparsities:
        out = folder / f"s{sparsity}"
        subprocess.run([cli, "export", *([str(model)] if model else []), str(out), "--sparsity", str(sparsity),
                        "--allocation", "acttail", "--mode", mode], check=True, capture_output=True)
        blocks[sparsity] = json.loads((out / "config.json").read_text())["activation_sparsity"]
    return folder / f"s{sparsities[0]}", blocks


def generate_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    def run(n: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync()
        return time.perf_counter() - start

    run(4)  # warm-up
    prefill = min(run(1) for _ in range(2))
    return (new_tokens - 1) / (run(new_tokens) - prefill)


def forward_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode steps driven directly (forward + argmax with the dynamic cache), without generate()'s own overhead."""
    model.prepare_sparse_decode()
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(2):  # warm-up steps
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync()
        return new_tokens / (time.perf_counter() - start)


def compiled_tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 8)
    model.prepare_sparse_decode()
    torch._dynamo.reset()

    def step(token, position):
        return model(token, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    with torch.inference_mode():
        positions = torch.arange(ids.shape[1], device=ids.device)
        token = model(ids, past_key_values=cache, cache_position=positions, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        position = torch.tensor([ids.shape[1]], device=ids.device)
        for _ in range(3):  # compile and record the graph (these tokens are written again below)
            compiled(token, position).argmax(-1, keepdim=True)
        sync()
        start = time.perf_counter()
        for i in range(new_tokens):
            token = compiled(token, position + i).argmax(-1, keepdim=True)
        sync()
        return new_tokens / (time.perf_counter() - start)


def step_error(model, ids: torch.Tensor) -> float:
    """Max |logits| difference of one decode step between this model's path and the reference path, relative to max |logits|."""
    model.prepare_sparse_decode()
    with torch.inference_mode():
        out = model(ids[:, :-1], use_cache=True)
        fast = model(ids[:, -1:], past_key_values=out.past_key_values).logits.float()
        backend = model.config.sparse_backend
        model.set_sparse_backend("reference")
        out = model(ids[:, :-1], use_cache=True)
        ref = model(ids[:, -1:], past_key_values=out.past_key_values).logits.float()
        model.set_sparse_backend(backend)
    return ((fast - ref).abs().max() / ref.abs().max()).item()


def checkpoint_layout(model) -> None:
    """Weights back in their [out, in] layout (the sparse rows store them input-major), for a fair dense row."""
    with torch.no_grad():
        for module in model.topk_modules().values():
            module.weight.data = module.weight.data.contiguous()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sparsity", default=None, help="comma-separated; default 0.5,0.8 (cuda) or 0.5,0.7 (cpu)")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32, help="cuda: decoder layers of the 7B-shaped model")
    parser.add_argument("--mode", choices=["topk", "threshold"], default="topk", help="cpu: the exports' runtime mode")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per row, in alternating order")
    parser.add_argument("--modes", default=None,
                        help="comma-separated generate,forward,compiled; default all three (cuda) or generate,forward (cpu)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sparsities = [float(s) for s in (args.sparsity or ("0.5,0.8" if cuda else "0.5,0.7")).split(",")]
    modes = (args.modes or ("generate,forward,compiled" if cuda else "generate,forward")).split(",")
    new_tokens = args.new_tokens or (128 if cuda else 32)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            model = synthetic_7b(args.layers)
            blocks = {s: uniform_block(model, s) for s in sparsities}
            ids = torch.randint(0, 32000, (1, args.prompt_tokens), device="cuda")
            name = f"Llama-2-7B-shaped ({args.layers} layers), random bf16, {torch.cuda.get_device_name()}"
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from acttail_export.text import wikipedia_text

            first, blocks = smollm2_exports(sparsities, Path(tmp), args.mode)
            model = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(first, trust_remote_code=True)
            ids = tokenizer(wikipedia_text()[:4000], return_tensors="pt").input_ids[:, :args.prompt_tokens]
            name = f"SmolLM2-135M fp32 ({args.mode}), CPU {torch.get_num_threads()} threads"
        rows = [(0.0, dense_block(blocks[sparsities[0]]))] + [(s, blocks[s]) for s in sparsities]
        print(f"{name}; prompt {ids.shape[1]} tokens, {new_tokens} new; torch {torch.__version__}")
        print("| mode | sparsity | tokens/s (median) | speed-up (median of per-round ratios) | decode-step logits vs reference path |")
        print("|---|---|---|---|---|")
        for mode in modes:
            # Rounds alternate the rows' order, so that drifts of a shared machine hit every row alike; medians.
            speeds = {sparsity: [] for sparsity, _ in rows}
            for round_ in range(args.rounds):
                for sparsity, block in (rows if round_ % 2 == 0 else rows[::-1]):
                    model.set_activation_sparsity(block)
                    if not sparsity:
                        checkpoint_layout(model)
                    run = {"generate": generate_tokens_per_s, "forward": forward_tokens_per_s,
                           "compiled": compiled_tokens_per_s}[mode]
                    speeds[sparsity].append(run(model, ids, new_tokens))
            for sparsity, block in rows:
                ratio = statistics.median(s / d for s, d in zip(speeds[sparsity], speeds[0.0]))
                error = "-"
                if sparsity:
                    model.set_activation_sparsity(block)
                    error = f"{step_error(model, ids):.1e} (relative)"
                print(f"| {mode} | {sparsity:.1f} | {statistics.median(speeds[sparsity]):.2f} | {ratio:.2f}x | {error} |",
                      flush=True)


if __name__ == "__main__":
    main()
