"""Export a Llama-2-7B-shaped model on this machine: wall time, spectra time and peak RSS, cold and with cached spectra.

The model is random bf16 weights in Llama-2-7B's shapes (6.7 B parameters, ~13.5 GB of safetensors shards with an index),
generated once into --model-dir (never committed). Each export runs as its own process; its peak RSS is that process's
``VmHWM`` (see :func:`run_measured`). Then the exported checkpoint is loaded in a fresh process with ``device_map="auto"`` and bfloat16 and runs
one forward pass.

    python benchmarks/bench_export_7b.py                      # generate (once), export cold, re-export cached, load
    python benchmarks/bench_export_7b.py --skip-load --keep   # keep the 13 GB input and output for another run
    python benchmarks/bench_export_7b.py --allocation calibrated --layers 4 --skip-load   # calibrated, layer by layer

Calibration (``--allocation calibrated`` or ``teal-greedy``, ``--mode threshold``) tokenizes text, so those runs give the
model SmolLM2-135M's tokenizer and its vocabulary (49152 rows of embeddings and lm_head instead of 32000: a larger head
than Llama-2-7B's, so the memory measured is an upper bound). ``--layers`` keeps the first N of the 32 decoder layers:
calibration holds one layer at a time, so its peak memory does not depend on N, its time grows linearly with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16",
}
SHARD_BYTES = 4 * 2**30  # four shards of at most 4 GiB, like a hub upload split by size


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]  # k/v width under grouped-query attention
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}"
        shapes |= {f"{prefix}.self_attn.{p}_proj.weight": (d, d) for p in "qo"}
        shapes |= {f"{prefix}.self_attn.{p}_proj.weight": (kv, d) for p in "kv"}
        shapes |= {f"{prefix}.mlp.gate_proj.weight": (f, d), f"{prefix}.mlp.up_proj.weight": (f, d),
                   f"{prefix}.mlp.down_proj.weight": (d, f)}
        shapes |= {f"{prefix}.input_layernorm.weight": (d,), f"{prefix}.post_attention_layernorm.weight": (d,)}
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (v, d)}
    return shapes


def generate_model(folder: Path, config: dict = LLAMA2_7B, tokenizer: Path | None = None) -> None:
    """Random bf16 weights (std 0.02, norms 1) in shards with a model.safetensors.index.json, written shard by shard;
    ``tokenizer``: a folder whose tokenizer files are copied beside them."""
    if (folder / "model.safetensors.index.json").is_file():
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(config)
    groups, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if len(shapes[n]) == 1 else torch.randn(shapes[n], generator=generator) * 0.02)
                   .to(torch.bfloat16) for n in names}
        save_file(tensors, tmp / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, shard)
        print(f"  wrote {shard} ({len(names)} tensors)", flush=True)
        del tensors
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer is not None:
            shutil.copy(tokenizer / name, tmp / name)
    tmp.rename(folder)


def run_measured(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds (user + system), peak RSS in GiB, stdout) of one child process.

    The peak is the child's own ``VmHWM``, read while it runs. Not ``ru_maxrss``: a child's also keeps the high-water
    mark of the forked copy of this process across exec, so it read 4.41 GiB for a 32-layer export that peaked at 0.8 GiB,
    after this process had generated the model's shards."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    peak_kib = [0]

    def watch() -> None:  # VmHWM only grows; the file goes when the child is reaped (a zombie's has no VmHWM)
        status = Path(f"/proc/{process.pid}/status")
        while True:
            try:
                lines = status.read_text().splitlines()
            except OSError:
                return
            peak_kib[0] = max([peak_kib[0]] + [int(line.split()[1]) for line in lines if line.startswith("VmHWM:")])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    watcher.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}")
    return wall, usage.ru_utime + usage.ru_stime, peak_kib[0] / 2**20, stdout


def spectra_seconds(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("spectra: done in")]
    return lines[0].split()[3] if lines else "-"


LOAD_CHECK = """
import sys, time, torch
from transformers import AutoModelForCausalLM
start = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, device_map="auto", dtype=torch.bfloat16)
loaded = time.perf_counter() - start
with torch.inference_mode():
    logits = model(torch.arange(1, 9)[None]).logits
# accelerate records the placement only when it spans devices; the parameters say where they are in every case
devices = sorted({str(p.device) for p in model.parameters()})
print(f"loaded in {loaded:.1f} s on {devices}, {model.dtype}; "
      f"forward of 8 tokens: logits {tuple(logits.shape)} {logits.dtype}, finite={bool(torch.isfinite(logits).all())}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "acttail-llama2-7b-shaped")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "acttail-llama2-7b-shaped-export")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--resparsity", type=float, default=0.7, help="Sparsity of the re-export from cached spectra.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--skip-load", action="store_true", help="Skip the device_map='auto' load check.")
    parser.add_argument("--allocation", default="acttail", help="export --allocation (calibrated: see above).")
    parser.add_argument("--mode", default="topk", help="export --mode.")
    parser.add_argument("--layers", type=int, default=32, help="Decoder layers kept of Llama-2-7B's 32.")
    parser.add_argument("--keep", action="store_true", help="Keep the generated model and the export.")
    parser.add_argument("--cold-only", action="store_true", help="Only the cold export (no re-export from the cache).")
    args = parser.parse_args()

    cli = str(Path(sys.executable).with_name("acttail-export"))
    config, tokenizer = {**LLAMA2_7B, "num_hidden_layers": args.layers}, None
    calibrates = args.allocation in ("calibrated", "teal-greedy") or args.mode == "threshold"
    if calibrates:
        from acttail_export.weights import resolve_model

        tokenizer = resolve_model(None).folder  # SmolLM2-135M's, with its vocabulary
        config |= {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}
    if config != LLAMA2_7B:
        args.model_dir = args.model_dir.with_name(f"{args.model_dir.name}-{args.layers}l-vocab{config['vocab_size']}")
    print(f"generating {args.model_dir} (once)", flush=True)
    generate_model(args.model_dir, config, tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "ACTTAIL_CACHE": cache}  # a cold spectra cache for the first export
        base = [cli, "export", str(args.model_dir), str(args.out), "--device", args.device, "--overwrite",
                "--allocation", args.allocation, "--mode", args.mode]
        runs = (("cold (spectra computed)", args.sparsity, []),
                ("re-export (cached spectra)", args.resparsity, []),
                ("re-export, cached, --link-weights", args.resparsity, ["--link-weights"]))
        if calibrates:  # every export calibrates again; the copy of the weights is measured above
            runs = (runs[0], runs[2])
        if args.cold_only:
            runs = runs[:1]
        for label, sparsity, extra in runs:
            print(f"export: {label}", flush=True)
            wall, cpu, rss, stdout = run_measured([*base, "--sparsity", str(sparsity), *extra], env)
            rows.append((label, sparsity, wall, cpu, spectra_seconds(stdout), rss))
            print(f"  {wall:.1f} s wall, {cpu:.0f} CPU-s, spectra {spectra_seconds(stdout)} s, peak RSS {rss:.2f} GiB",
                  flush=True)
    if not args.skip_load:
        print("load check", flush=True)
        wall, cpu, rss, stdout = run_measured([sys.executable, "-c", LOAD_CHECK, str(args.out)], dict(os.environ))
        rows.append(("load device_map=auto bf16 + forward", args.resparsity, wall, cpu, "-", rss))
        print(stdout.strip())
    print(f"\nLlama-2-7B-shaped, {args.layers} layers, vocabulary {config['vocab_size']} "
          f"({sum(torch.Size(s).numel() for s in tensor_shapes(config).values()) / 1e9:.2f} B parameters, bf16), "
          f"{os.cpu_count()} CPUs, spectra on {args.device}, --allocation {args.allocation} --mode {args.mode}")
    print(f"| {'step':38s} | sparsity | wall s | CPU s | spectra s | peak RSS GiB |")
    print(f"|{'-' * 40}|---------:|-------:|------:|----------:|-------------:|")
    for label, sparsity, wall, cpu, spectra, rss in rows:
        print(f"| {label:38s} | {sparsity:8.2f} | {wall:6.1f} | {cpu:5.0f} | {spectra:>9s} | {rss:12.2f} |")
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
        shutil.rmtree(args.model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
