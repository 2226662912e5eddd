"""Spread of SmolLM2's CPU decode speed-up across fresh processes: how often a whole process loses the sparse gain.

    python benchmarks/bench_decode_spread.py --processes 10 --dtype float32
    python benchmarks/bench_decode_spread.py --processes 10 --dtype bfloat16
    python benchmarks/bench_decode_spread.py --processes 3 --batch 4   # 4 sequences decoded together

The CLI exports SmolLM2-135M at each sparsity once; then every process loads the first export in ``--dtype`` (as a
user would: ``from_pretrained(..., trust_remote_code=True)``), times ``generate()`` of ``--new-tokens`` greedy tokens
for the dense row (every k = d_in, weights in their checkpoint layout) and each sparse row, in alternating order,
``--rounds`` times after a warm-up, and keeps each row's best. A process's speed-up is its best sparse over its best
dense tokens/s; the table gives min / median / max over the processes, and every process's figures follow it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import checkpoint_layout, saved_blocks, smollm2_exports  # noqa: E402


def tokens_per_s(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of one ``generate()`` (every row of ``ids`` together): new tokens after the first over the time
    past the prefill's."""
    def run(n: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - start

    prefill = min(run(1) for _ in range(2))
    return ids.shape[0] * (new_tokens - 1) / (run(new_tokens) - prefill)


def child(checkpoint: Path, blocks: dict[str, dict], dtype: str, new_tokens: int, rounds: int, batch: int = 1) -> dict:
    """One fresh process: best tokens/s of each row (``blocks``: name -> activation_sparsity block), ``batch``
    sequences of 64 prompt tokens (consecutive pieces of the text) decoded together."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from acttail_export.text import wikipedia_text

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    ids = tokenizer(wikipedia_text()[:20000], return_tensors="pt").input_ids[:, :64 * batch].reshape(batch, 64)
    best = {name: 0.0 for name in blocks}
    for round_ in range(rounds + 1):  # round 0 warms up every row (numba's cache, allocator, lazy imports)
        for name, block in (list(blocks.items()) if round_ % 2 else list(blocks.items())[::-1]):
            model.set_activation_sparsity(block)
            if name == "dense":
                checkpoint_layout(model)
            speed = tokens_per_s(model, ids, new_tokens if round_ else 4)
            if round_:
                best[name] = max(best[name], speed)
    return best


def random_llama(shape: str, folder: Path) -> Path:
    """A Llama checkpoint of the given shapes with random bf16 weights and SmolLM2's tokenizer (built once)."""
    from bench_export_7b import LLAMA2_7B, generate_model

    from acttail_export.weights import resolve_model

    hidden, intermediate, layers, heads, kv_heads = (int(v) for v in shape.split(","))
    tokenizer_dir = resolve_model(None).folder  # the embedded SmolLM2, converted once into the cache
    config = {**LLAMA2_7B, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": 49152}
    generate_model(folder, config, tokenizer_dir)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--sparsity", default="0.5,0.7", help="comma-separated sparsities of the exports")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed generate() calls per row and process")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--exports", type=Path, default=None, help="reuse the exports in this folder (one per sparsity)")
    parser.add_argument("--random-llama", default=None, metavar="HIDDEN,INTERMEDIATE,LAYERS,HEADS,KV_HEADS",
                        help="instead of SmolLM2, a Llama of these shapes with random weights (SmolLM2's tokenizer), "
                             "built once into --exports: a model whose decode is mostly weight reads")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON arguments of one measuring process
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(Path(spec["checkpoint"]), spec["blocks"], args.dtype, args.new_tokens, args.rounds,
                               args.batch)))
        return
    from acttail_export.evaluate import dense_block

    sparsities = [float(s) for s in args.sparsity.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.exports or Path(tmp)
        blocks = saved_blocks(sparsities, folder)
        if blocks is None:
            model = random_llama(args.random_llama, folder / "model") if args.random_llama else None
            _, blocks = smollm2_exports(sparsities, folder, model=model)
        spec = {"checkpoint": str(folder / f"s{sparsities[0]}"),
                "blocks": {"dense": dense_block(blocks[sparsities[0]]), **{str(s): blocks[s] for s in sparsities}}}
        runs = []
        for _ in range(args.processes):
            out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--new-tokens", str(args.new_tokens),
                                  "--rounds", str(args.rounds), "--batch", str(args.batch),
                                  "--child", json.dumps(spec)],
                                 capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if out.returncode:
                sys.exit(f"a measuring process failed:\n{out.stderr[-3000:]}")
            runs.append(json.loads(out.stdout.splitlines()[-1]))
            print("process", len(runs), " ".join(f"{k}={v:.2f}" for k, v in runs[-1].items()), flush=True)
    name = f"random Llama {args.random_llama}" if args.random_llama else "SmolLM2-135M"
    print(f"{name} {args.dtype}, batch {args.batch}, generate() of {args.new_tokens} tokens, "
          f"best of {args.rounds} per row, {args.processes} fresh processes, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print("| sparsity | dense tok/s (median) | sparse tok/s (median) | speed-up min | median | max |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in sparsities:
        ratios = [run[str(s)] / run["dense"] for run in runs]
        print(f"| {s:.1f} | {statistics.median(r['dense'] for r in runs):.2f} | "
              f"{statistics.median(r[str(s)] for r in runs):.2f} | {min(ratios):.2f}x | {statistics.median(ratios):.2f}x "
              f"| {max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
