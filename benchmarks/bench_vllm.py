"""vLLM decode speed on CPU: dense SmolLM2-135M against its sparse exports served through the plugin, batch 1 and 8.

Run under .venv-vllm (``bash scripts/setup_vllm.sh``): ``.venv-vllm/bin/python benchmarks/bench_vllm.py``. Exports
SmolLM2 (TopK 50% and 70%, threshold 50%) into ``--out`` unless there, then runs one engine per checkpoint in its own
process and prints a markdown table: decode tokens/s and per-token latency (ms per step), and the speed-up over dense.
Decode time is the time of a greedy generation of ``--tokens`` + 1 tokens minus that of 1 token (the prompt's
prefill and the first token). A 2-layer, 128-wide random model gives vLLM's own per-step cost (scheduling, sampling,
Python), which no kernel can remove. Engines run eagerly (``enforce_eager``) unless ``--compiled`` (vLLM's default:
torch.compile's graph, the plugin's layers one custom op in it). ``--dense-copy`` adds each sparse checkpoint served
with the plugin's copy of the weights for vLLM's dense GEMM in the masked steps (``ACTTAIL_VLLM_DENSE_GEMM=1``).

``--random-llama 2048,5632,22,32,4`` serves a larger model instead of SmolLM2 (random bf16 weights in those shapes,
TinyLlama-1.1B's here, built once into ``--out``): one whose decode step is mostly weight reads, where vLLM's per-step
cost no longer hides what the sparse GEMV saves.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXPORTS = {"topk-50": ["--sparsity", "0.5", "--allocation", "acttail"],
           "topk-70": ["--sparsity", "0.7", "--allocation", "acttail"],
           "threshold-50": ["--sparsity", "0.5", "--allocation", "acttail", "--mode", "threshold"]}
PROMPT = "The history of the city begins in the Roman period, when"


def measure(model: str, batches: list[int], tokens: int, dtype: str, repeats: int, memory: float,
            compiled: bool) -> dict:
    """One engine: per batch size, the best of ``repeats`` decode timings (``tokens`` steps of ``batch`` rows)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, enforce_eager=not compiled, gpu_memory_utilization=memory, max_model_len=512, seed=0,
              skip_tokenizer_init=True)
    results = {}
    for batch in batches:
        prompts = [{"prompt_token_ids": [1 + (7 * i + j) % 200 for j in range(16)]} for i in range(batch)]

        def run(n: int) -> float:
            params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, detokenize=False)
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            return time.perf_counter() - start

        run(tokens + 1)  # warm-up: numba's kernels, allocator
        decode = min(run(tokens + 1) - run(1) for _ in range(repeats))
        results[batch] = {"tokens_per_s": batch * tokens / decode, "ms_per_step": 1000 * decode / tokens}
    return results


def in_process(args) -> None:
    batches = [int(b) for b in args.batches.split(",")]
    result = measure(args.model, batches, args.tokens, args.dtype, args.repeats, args.gpu_memory_utilization,
                     args.compiled)
    print("RESULT " + json.dumps(result))


def subprocess_measure(model, args, env: dict | None = None) -> dict:
    command = [sys.executable, __file__, "--one", "--model", str(model), "--batches", args.batches, "--tokens",
               str(args.tokens), "--dtype", args.dtype, "--repeats", str(args.repeats),
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (["--compiled"] if args.compiled else [])
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.exit(f"engine on {model} failed:\n{result.stderr[-3000:]}")
    return {int(b): r for b, r in json.loads(lines[-1].removeprefix("RESULT ")).items()}


def prepare(out: Path, only: list[str] | None, random_llama: str | None) -> dict[str, Path]:
    """The checkpoints of the rows: the dense model, its exports (made unless there) and the per-step floor model."""
    from acttail_export.weights import resolve_model

    if random_llama:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_decode_spread import random_llama as build_random_llama

        prefix = "llama-" + random_llama.replace(",", "-")
        dense = build_random_llama(random_llama, out / prefix)
    else:
        prefix, dense = "smollm2", resolve_model(None).folder
    models = {"dense": dense}
    cli = Path(sys.executable).parent / "acttail-export"
    for name, options in EXPORTS.items():
        folder = out / f"{prefix}-{name}"
        if only and name not in only:
            continue
        if not (folder / "config.json").exists():
            subprocess.run([str(cli), "export", str(dense), str(folder), *options], check=True,
                           capture_output=True, env={**os.environ, "TQDM_DISABLE": "1"})
        models[name] = folder
    tiny = out / "tiny-overhead"
    if not (tiny / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        # head_dim 64: vLLM's CPU attention refuses 16
        LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
                         ).save_pretrained(tiny)
    models["floor"] = tiny
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench-vllm"))
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--only", default=None,
                        help="comma-separated subset of the rows (dense, topk-50, topk-70, threshold-50, floor)")
    parser.add_argument("--random-llama", default=None, metavar="HIDDEN,INTERMEDIATE,LAYERS,HEADS,KV_HEADS",
                        help="instead of SmolLM2, a Llama of these shapes with random weights (built once into --out)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.1,
                        help="vLLM's flag; on CPU the share of RAM for the weights and the KV cache (0.35 for 1.1 B in float32)")
    parser.add_argument("--dense-copy", action="store_true",
                        help="also run each sparse checkpoint with ACTTAIL_VLLM_DENSE_GEMM=1 (a second copy of the "
                             "weights: batches past the break-even run vLLM's oneDNN GEMM instead of torch's matmul)")
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's default mode (torch.compile's graph of the model; the plugin's layers are one "
                             "custom op in it) instead of enforce_eager; the first start of each model compiles")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return in_process(args)
    only = args.only.split(",") if args.only else None
    models = prepare(args.out, only, args.random_llama)
    if only:
        models = {name: path for name, path in models.items() if name in only}
    batches = [int(b) for b in args.batches.split(",")]
    per_model = {name: subprocess_measure(path, args) for name, path in models.items()}
    if args.dense_copy:
        for name in [name for name in models if name in EXPORTS]:
            per_model[f"{name}, dense copy"] = subprocess_measure(models[name], args, {"ACTTAIL_VLLM_DENSE_GEMM": "1"})
    results = {(name, b): per_model[name][b] for b in batches for name in per_model}
    print(f"{'random Llama ' + args.random_llama if args.random_llama else 'SmolLM2-135M'}, {args.dtype}, "
          f"{'compiled (vLLM default)' if args.compiled else 'enforce_eager'}, "
          f"{args.tokens} decode steps, best of {args.repeats}; floor: a 2-layer 128-wide random Llama (vLLM's own "
          "cost of a step)")
    print(f"| checkpoint ({args.dtype}) | batch | decode tokens/s | ms per step | vs dense |")
    print("|---|---:|---:|---:|---:|")
    for (name, batch), r in results.items():
        dense = results.get(("dense", batch))
        compared = dense and name not in ("dense", "floor")
        ratio = f"{r['tokens_per_s'] / dense['tokens_per_s']:.2f}x" if compared else ""
        print(f"| {name} | {batch} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
