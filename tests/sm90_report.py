"""Build the Triton kernels for Hopper (sm_90) on a machine without a GPU and report what the hardware would get.

Run by tests/test_kernel_compile.py in a fresh process: kernels built for a GPU and kernels run by Triton's interpreter
(the rest of the test session) cannot share one process, since Triton decorates its own library once, one way or the
other. Prints one JSON object: ``compiled``, a row per kernel variant (registers, stack, local memory, shared memory),
and ``analysis``, a row per kernel with the seconds torch's write analysis took and the pointers it found written.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
import topk_triton  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
GEMV_INTS = "D N end0 end1 rows_per_split stride_x stride_wt stride_out stride_cut k0 k1 k2 density".split()
GEMV_CONSTEXPRS = "FIND_CUT HAS_BIAS ATOMIC KEY_BITS BLOCK_D BLOCK_N BLOCK_K COMPACT BLOCK_C".split()
ROW_LENGTHS = (4096, 11008, 14336)  # Llama-2-7B / Llama-3-8B inputs: hidden, and the two MLP widths


def resources(kernel, signature: dict, constexprs: dict, num_warps: int) -> dict:
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=HOPPER,
                              options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([CUOBJDUMP, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    registers, stack, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", report).groups())
    return {"registers": registers, "stack": stack, "local": local, "shared": compiled.metadata.shared}


def compiled_rows() -> list[dict]:
    rows = []
    for d in ROW_LENGTHS:
        for dtype in POINTER:
            for find_cut, compact in itertools.product((True, False), (True, False)):
                tiles = topk_triton.TILES[dtype.itemsize]
                for block_k, warps in tiles:
                    if dtype == torch.float16 and (block_k, warps) != tiles[-1]:
                        continue  # fp16 shares bf16's code; its largest tile is the one at risk
                    signature = {"x_ptr": POINTER[dtype], "wt_ptr": POINTER[dtype], "bias_ptr": POINTER[dtype],
                                 "out_ptr": "*fp32", "cut_ptr": "*i32", "scratch_ptr": "*i32",
                                 **{n: "i32" for n in GEMV_INTS}, **{n: "constexpr" for n in GEMV_CONSTEXPRS}}
                    constexprs = {"FIND_CUT": find_cut, "HAS_BIAS": True, "ATOMIC": True,
                                  "KEY_BITS": topk_triton.KEY_BITS[dtype], "BLOCK_D": triton.next_power_of_2(d),
                                  "BLOCK_N": 128, "BLOCK_K": block_k, "COMPACT": compact,
                                  "BLOCK_C": topk_triton.LIST_CHUNK}
                    used = resources(topk_triton._sparse_gemv_kernel, signature, constexprs, warps)
                    rows.append({"kernel": "sparse_gemv", "d": d, "dtype": str(dtype), "find_cut": find_cut,
                                 "compact": compact, "block_k": block_k, "num_warps": warps, **used})
            if dtype != torch.float16:
                signature = {"x_ptr": POINTER[dtype], "cut_ptr": "*i32", "D": "i32", "stride_x": "i32", "k0": "i32",
                             "k1": "i32", "k2": "i32", "KEY_BITS": "constexpr", "BLOCK_D": "constexpr"}
                block_d = triton.next_power_of_2(d)
                warps = topk_triton.cut_kernel_warps(block_d)
                used = resources(topk_triton._topk_cut_kernel, signature,
                                 {"KEY_BITS": topk_triton.KEY_BITS[dtype], "BLOCK_D": block_d}, warps)
                rows.append({"kernel": "topk_cut", "d": d, "dtype": str(dtype), "num_warps": warps, **used})
    return rows


class HopperStub:
    """A driver that only names its target: enough for Triton to build the TTIR that torch analyses."""

    def get_current_target(self):
        return HOPPER


def written_pointers(kernel, kwargs: dict) -> list[str]:
    """The arguments torch's analysis finds written: ``identify_accessed_tensors`` in newer torch,
    ``identify_mutated_tensors`` in torch <= 2.11 (the GPU image's). Both fall back to every tensor on failure."""
    from torch._higher_order_ops import triton_kernel_wrap

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):
        accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(triton_kernel_wrap.identify_mutated_tensors(kernel, kwargs, {}))


def analysis_rows() -> list[dict]:
    triton.runtime.driver.set_active(HopperStub())
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        fake = lambda t=dtype: torch.empty(4, dtype=t)  # noqa: E731
        for find_cut in (True, False):
            kwargs = {"x_ptr": fake(), "wt_ptr": fake(), "bias_ptr": fake(), "out_ptr": fake(torch.float32),
                      "cut_ptr": fake(torch.int32), "scratch_ptr": fake(torch.int32), "D": 14336, "N": 12288,
                      "end0": 4096, "end1": 8192, "rows_per_split": 1024, "stride_x": 14336, "stride_wt": 12288,
                      "stride_out": 12288, "stride_cut": 0, "k0": 2048, "k1": 1000, "k2": 3000, "density": 2,
                      "FIND_CUT": find_cut, "HAS_BIAS": True, "ATOMIC": True, "KEY_BITS": topk_triton.KEY_BITS[dtype],
                      "BLOCK_D": 16384, "BLOCK_N": 128, "BLOCK_C": topk_triton.LIST_CHUNK}
            start = time.perf_counter()
            writes = written_pointers(topk_triton._sparse_gemv_tuned[dtype.itemsize], kwargs)
            rows.append({"kernel": "sparse_gemv", "dtype": str(dtype), "find_cut": find_cut,
                         "seconds": time.perf_counter() - start, "writes": writes})
        kwargs = {"x_ptr": fake(), "cut_ptr": fake(torch.int32), "D": 14336, "stride_x": 14336, "k0": 1, "k1": 2,
                  "k2": 3, "KEY_BITS": topk_triton.KEY_BITS[dtype], "BLOCK_D": 16384}
        start = time.perf_counter()
        writes = written_pointers(topk_triton._topk_cut_kernel, kwargs)
        rows.append({"kernel": "topk_cut", "dtype": str(dtype), "seconds": time.perf_counter() - start,
                     "writes": writes})
    return rows


if __name__ == "__main__":
    print(json.dumps({"compiled": compiled_rows() if CUOBJDUMP.exists() else None, "analysis": analysis_rows()}))
