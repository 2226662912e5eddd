"""CPU kernel-level speed of a TopK decode step (selection + sparse GEMV) against a dense GEMV, at 7B/8B layer shapes,
fp32 or bf16, batch 1 or more rows (the GPU kernels: ``benchmarks/gpu_check.py``, section "kernels").

    python benchmarks/bench_topk_kernels.py [--rows 1,4,8] [--dtype bfloat16] [--shapes SmolLM2]

The mean over enough calls that cycle through copies of the weight larger than any L3 cache together (1 GB),
each with a new input, so that every call reads from memory as a decode step does; sparse = ``sparse_gemv_cpu`` (the
path it picks: the direct numba GEMV, or the bags of the kept rows then one ``embedding_bag`` on torch's threads),
embedding_bag = the latter forced, bags = building them alone, masked = what a step past the batch break-even runs
instead (``kept_masks``, then ``masked_gemm_cpu`` of the masked input). The ideal speed-up of a memory-bound one-row GEMV is
1 / (1 - s).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from acttail_export.kernels.topk_cpu import GemvPlan, gemv_bags, kept_masks, masked_gemm_cpu, sparse_gemv_cpu

SHAPES = {  # (d_in, d_out): the projections of SmolLM2-135M, Llama-2-7B and Llama-3-8B
    "SmolLM2 gate+up 576x3072": (576, 3072),
    "SmolLM2 down 1536x576": (1536, 576),
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 4096x11008": (4096, 11008),
    "7B down 11008x4096": (11008, 4096),
    "8B gate/up 4096x14336": (4096, 14336),
    "8B down 14336x4096": (14336, 4096),
}
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)


def cpu_times(d_in: int, d_out: int, k: int, dtype: torch.dtype, rows: int = 1,
              cycled_bytes: float = 1e9) -> tuple[float, float, float, float, float]:
    copies = int(cycled_bytes // (d_in * d_out * dtype.itemsize)) + 2
    weights = [(torch.randn(d_out, d_in) / d_in**0.5).to(dtype) for _ in range(copies)]
    weights_t = [w.t().contiguous() for w in weights]
    xs = [torch.randn(rows, d_in).to(dtype) for _ in range(61)]  # a new input at each call: kept rows differ, as from step to step
    plan = GemvPlan([d_out], [k], None, dtype)
    bag_plan = GemvPlan([d_out], [k], None, dtype)
    bag_plan.direct = False  # always the bags and embedding_bag
    zero = torch.zeros((), dtype=dtype)

    def mean_us(step, calls=max(20, 4 * copies)):
        for i in range(copies):
            step(i)
        start = time.perf_counter()
        for i in range(calls):
            step(i)
        return (time.perf_counter() - start) / calls * 1e6

    dense = mean_us(lambda i: F.linear(xs[i % 61], weights[i % copies]))
    bags = mean_us(lambda i: gemv_bags(plan, xs[i % 61]))
    sparse = mean_us(lambda i: sparse_gemv_cpu(xs[i % 61], weights_t[i % copies], plan))
    bagged = mean_us(lambda i: sparse_gemv_cpu(xs[i % 61], weights_t[i % copies], bag_plan))
    masked = mean_us(lambda i: masked_gemm_cpu(torch.where(kept_masks(plan, xs[i % 61])[0], xs[i % 61], zero),
                                               weights_t[i % copies]))
    return dense, bags, sparse, bagged, masked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--shapes", default=None, help="comma-separated prefixes of the shape names (default: all)")
    parser.add_argument("--rows", default="1", help="comma-separated rows per step (a batch of decode tokens)")
    parser.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)), help="comma-separated sparsities")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"device: CPU, {torch.get_num_threads()} threads, {args.dtype}, torch {torch.__version__}")
    print("| shape (d_in x d_out) | rows | sparsity | k | dense us | bags us | sparse us | embedding_bag us | masked us "
          "| speed-up | vs masked | ideal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (d_in, d_out) in SHAPES.items():
        if args.shapes and not any(name.startswith(prefix) for prefix in args.shapes.split(",")):
            continue
        for rows in map(int, args.rows.split(",")):
            for sparsity in map(float, args.sparsities.split(",")):
                k = max(1, round((1 - sparsity) * d_in))
                dense, bags, sparse, bagged, masked = cpu_times(d_in, d_out, k, dtype, rows)
                print(f"| {name} | {rows} | {sparsity:.1f} | {k} | {dense:.1f} | {bags:.1f} | {sparse:.1f} | {bagged:.1f} "
                      f"| {masked:.1f} | {dense / sparse:.2f}x | {masked / sparse:.2f}x | {1 / (1 - sparsity):.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
