"""CPU kernel-level speed of a TopK decode step (selection + sparse GEMV) against a dense GEMV, at 7B/8B layer shapes,
batch 1, fp32 (the GPU kernels: ``benchmarks/gpu_check.py``, section "kernels").

    python benchmarks/bench_topk_kernels.py

The mean over enough calls
that cycle through copies of the weight larger than the L3 cache together, each with a new input, so that every call reads from memory as a
decode step does; sparse = ``select_cpu`` + ``sparse_linear_cpu`` (numba, or embedding_bag above 8 MiB of kept weights). The ideal speed-up of a memory-bound GEMV is 1 / (1 - s).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from acttail_export.kernels.topk_cpu import select_cpu, sparse_linear_cpu

SHAPES = {  # (d_in, d_out): the projections of Llama-2-7B and Llama-3-8B
    "7B q/k/v/o 4096x4096": (4096, 4096),
    "7B gate/up 4096x11008": (4096, 11008),
    "7B down 11008x4096": (11008, 4096),
    "8B gate/up 4096x14336": (4096, 14336),
    "8B down 14336x4096": (14336, 4096),
}
SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)


def cpu_times(d_in: int, d_out: int, k: int, l3_bytes: float = 96e6) -> tuple[float, float, float]:
    copies = int(l3_bytes // (d_in * d_out * 4)) + 2
    weights = [torch.randn(d_out, d_in) / d_in**0.5 for _ in range(copies)]
    weights_t = [w.t().contiguous() for w in weights]
    xs = [torch.randn(1, d_in) for _ in range(61)]  # a new input at each call: kept rows differ, as from step to step

    def mean_us(step, calls=max(20, 4 * copies)):
        for i in range(copies):
            step(i)
        start = time.perf_counter()
        for i in range(calls):
            step(i)
        return (time.perf_counter() - start) / calls * 1e6

    dense = mean_us(lambda i: F.linear(xs[i % 61], weights[i % copies]))
    select = mean_us(lambda i: select_cpu(xs[i % 61], [k]))
    sparse = mean_us(lambda i: sparse_linear_cpu(xs[i % 61], select_cpu(xs[i % 61], [k])[0], weights_t[i % copies], None))
    return dense, select, sparse


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    torch.manual_seed(0)
    print(f"device: CPU, {torch.get_num_threads()} threads, fp32, batch 1, torch {torch.__version__}")
    times = cpu_times
    print("| shape (d_in x d_out) | sparsity | k | dense us | select us | select+GEMV us | speed-up | ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (d_in, d_out) in SHAPES.items():
        for sparsity in SPARSITIES:
            k = max(1, round((1 - sparsity) * d_in))
            dense, select, sparse = times(d_in, d_out, k)
            print(f"| {name} | {sparsity:.1f} | {k} | {dense:.1f} | {select:.1f} | {sparse:.1f} | {dense / sparse:.2f}x "
                  f"| {1 / (1 - sparsity):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
