"""Triton decode kernels for TopK activation sparsity: exact per-row selection, then a GEMV that reads only kept weight rows.

A decode step of projection p computes ``y = W x_k`` where ``x_k`` keeps the k largest-magnitude entries of x. With the
weight stored input-major (``weight_t = W^T``, ``[d_in, d_out]``, built at load time) the kept entries select whole
contiguous rows of ``weight_t``, so the step reads ``k / d_in`` of the weight bytes:

1. ``topk_select`` (one program per row) finds, for each of up to three k (q/k/v or gate/up share one call), the k-th
   largest magnitude by bisection over its bit pattern, breaks ties at it by index as the torch reference does
   (``topk.py``), and writes the kept indices in ascending order.
2. ``sparse_gemv`` splits the kept indices over programs (split-K), each reading ``[BLOCK_K, BLOCK_N]`` tiles of the kept
   rows and accumulating in fp32; a second kernel adds the partial sums and the bias and casts to the input dtype.

Both are torch custom ops (``torch.library.triton_op``) so ``torch.compile`` and CUDA graphs capture a decode step.
Shipped flat inside every exported checkpoint; ``modeling_acttail.py`` imports this file inside try/except, so machines
without Triton load the model and use another path.
"""

import os

import torch

from .topk import KEY_TYPES

try:  # a try block keeps transformers' import check from requiring Triton; the modeling file catches the ImportError
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("Triton is not installed: the TopK decode kernels are unavailable") from error

__all__ = ["topk_select", "sparse_gemv", "MAX_SHARED_K"]

MAX_SHARED_K = 3  # projections sharing one selection: q/k/v


@triton.jit
def _topk_select_kernel(
    keys_ptr,  # [B, D] int16/int32: the bits of x (x.view(int)); the sign bit is cleared here
    idx_ptr,  # [B, k0 + k1 + k2] int32 out: member j's kept indices, ascending, in columns [k0 + .. + k(j-1), + kj)
    D,  # entries per row
    stride_keys,  # row stride of keys
    stride_idx,  # row stride of idx
    k0,  # entries kept for member 0
    k1,  # ... member 1 (if NUM_K > 1)
    k2,  # ... member 2 (if NUM_K > 2)
    NUM_K: tl.constexpr,  # members sharing this selection, 1..3
    K_PAD: tl.constexpr,  # NUM_K rounded up to a power of two
    KEY_BITS: tl.constexpr,  # magnitude bits: 15 for fp16/bf16, 31 for fp32
    BLOCK_D: tl.constexpr,  # power of two >= D: the whole row lives in registers
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    in_row = offs < D
    keys = tl.load(keys_ptr + row * stride_keys + offs, mask=in_row, other=0).to(tl.int32)
    keys = keys & ((1 << KEY_BITS) - 1)
    keys = tl.where(in_row, keys, -1)  # padding ranks below every real entry
    member = tl.arange(0, K_PAD)
    ks = tl.where(member == 0, k0, tl.where(member == 1, k1, k2))
    # The k-th largest key is the largest t with count(keys >= t) >= k: set its bits from the top down, for every
    # member at once (one reduction per bit, not one per bit and member: the reductions are the latency).
    t = tl.zeros([K_PAD], dtype=tl.int32)
    for bit in tl.static_range(KEY_BITS - 1, -1, -1):
        candidate = t | (1 << bit)
        count = tl.sum((keys[None, :] >= candidate[:, None]).to(tl.int32), axis=1)
        t = tl.where(count >= ks, candidate, t)
    start = 0
    for j in tl.static_range(NUM_K):
        k = tl.sum(tl.where(member == j, ks, 0), axis=0)
        kth = tl.sum(tl.where(member == j, t, 0), axis=0)
        # Keep every key above the k-th, then the lowest-index keys equal to it until k are kept.
        above = keys > kth
        room = k - tl.sum(above.to(tl.int32), axis=0)
        tied = keys == kth
        keep = above | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= room))
        slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row * stride_idx + start + slot, offs, mask=keep)
        start += k


@triton.jit
def _gather_gemv_kernel(
    x_ptr,  # [B, D] input rows
    idx_ptr,  # [B, >= K] int32 kept input indices per row
    wt_ptr,  # [D, N] input-major weight, contiguous rows
    part_ptr,  # [SPLIT_K, B, N] fp32 out: partial sums
    N,  # output features
    K,  # kept indices per row
    k_per_split,  # kept indices per program, a multiple of BLOCK_K
    stride_x,  # row stride of x
    stride_idx,  # row stride of idx
    stride_wt,  # row stride of wt
    stride_part_split,  # split stride of part
    stride_part_row,  # row stride of part
    BLOCK_N: tl.constexpr,  # output features per program
    BLOCK_K: tl.constexpr,  # kept weight rows per loaded tile
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for k_start in range(split * k_per_split, tl.minimum((split + 1) * k_per_split, K), BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        idx = tl.load(idx_ptr + row * stride_idx + offs_k, mask=k_mask, other=0).to(tl.int64)
        x = tl.load(x_ptr + row * stride_x + idx, mask=k_mask, other=0.0).to(tl.float32)
        # Masked-off lanes issue no memory traffic: only the kept rows of wt are read.
        w = tl.load(wt_ptr + idx[:, None] * stride_wt + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * x[:, None]
    part = tl.sum(acc, axis=0)
    tl.store(part_ptr + split * stride_part_split + row * stride_part_row + offs_n, part, mask=n_mask)


@triton.jit
def _reduce_kernel(
    part_ptr,  # [SPLIT_K, B, N] fp32 partial sums
    bias_ptr,  # [N] bias (unused unless HAS_BIAS)
    out_ptr,  # [B, N] out, in the input dtype
    N,  # output features
    stride_part_split,  # split stride of part
    stride_part_row,  # row stride of part
    stride_out,  # row stride of out
    SPLIT_K: tl.constexpr,  # partial sums per output
    HAS_BIAS: tl.constexpr,  # add bias
    BLOCK_N: tl.constexpr,  # outputs per program
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + split * stride_part_split + row * stride_part_row + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def _programs_wanted(device: torch.device) -> int:
    """Enough programs to keep every SM streaming weight rows (a few per SM)."""
    if device.type != "cuda":
        return 8  # the interpreter: few programs, quick tests
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _gemv_blocks(n: int, k: int, rows: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, split, k_per_split) for an N-output GEMV over k kept rows."""
    block_n = 128 if n >= 2048 else 64
    block_k = 32
    n_blocks = triton.cdiv(n, block_n)
    split = max(1, min(_programs_wanted(device) // (n_blocks * rows), triton.cdiv(k, block_k), 64))
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return block_n, block_k, triton.cdiv(k, k_per_split), k_per_split


def _launch(kernel):
    """The kernel as torch.compile can trace it (``wrap_triton``); outside tracing it launches as usual."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None else kernel


def _topk_select(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Kept input indices of each row for each k in ``ks`` (exact TopK of |x|, ranked as ``topk.topk_order`` ranks).

    :param x: ``[B, D]`` fp16 / bf16 / fp32 activations with contiguous rows
    :param ks: 1 to 3 counts, one per projection reading x
    :returns: int32 ``[B, sum(ks)]``; projection j's indices, ascending, are columns ``[sum(ks[:j]), sum(ks[:j + 1]))``
    """
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [B, D] with contiguous rows, got {tuple(x.shape)} {x.stride()}"
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}"
    assert 1 <= len(ks) <= MAX_SHARED_K and all(1 <= k <= x.shape[1] for k in ks), f"bad ks {ks} for d={x.shape[1]}"
    rows, d = x.shape
    idx = torch.empty(rows, sum(ks), dtype=torch.int32, device=x.device)
    keys = x.view(KEY_TYPES[x.dtype][0])  # the kernel clears the sign bit itself
    padded = list(ks) + [0] * (MAX_SHARED_K - len(ks))
    block_d = triton.next_power_of_2(d)
    _launch(_topk_select_kernel)[(rows,)](
        keys, idx, d, keys.stride(0), idx.stride(0), *padded,
        NUM_K=len(ks), K_PAD=triton.next_power_of_2(len(ks)), KEY_BITS=15 if keys.dtype == torch.int16 else 31, BLOCK_D=block_d,
        num_warps=max(1, min(16, block_d // 512)),
    )
    return idx


def _sparse_gemv(x: torch.Tensor, idx: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[b] = sum_i x[b, idx[b, i]] * weight_t[idx[b, i]] + bias``, reading only the kept rows of ``weight_t``.

    :param x: ``[B, D]`` activations
    :param idx: int32 ``[B, k]`` kept indices per row (a column slice of :func:`topk_select`'s output)
    :param weight_t: ``[D, N]`` input-major weight (``linear.weight.t()`` stored contiguous)
    :param bias: ``[N]`` or None
    :returns: ``[B, N]`` in x's dtype, accumulated in fp32
    """
    assert x.dim() == 2 and x.stride(-1) == 1 and idx.dim() == 2 and idx.stride(-1) == 1, "x and idx must have contiguous rows"
    assert idx.dtype == torch.int32 and idx.shape[0] == x.shape[0], f"idx must be int32 [B, k], got {idx.dtype} {tuple(idx.shape)}"
    assert weight_t.dim() == 2 and weight_t.shape[0] == x.shape[1] and weight_t.stride(-1) == 1, (
        f"weight_t must be input-major [d_in={x.shape[1]}, d_out] with contiguous rows, got {tuple(weight_t.shape)}"
    )
    rows, k = idx.shape
    n = weight_t.shape[1]
    block_n, block_k, split, k_per_split = _gemv_blocks(n, k, rows, x.device)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    _launch(_gather_gemv_kernel)[(triton.cdiv(n, block_n), split, rows)](
        x, idx, weight_t, part, n, k, k_per_split,
        x.stride(0), idx.stride(0), weight_t.stride(0), part.stride(0), part.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    reduce_block = 256
    _launch(_reduce_kernel)[(triton.cdiv(n, reduce_block), rows)](
        part, bias if bias is not None else part, out, n, part.stride(0), part.stride(1), out.stride(0),
        SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK_N=reduce_block, num_warps=4,
    )
    return out


def _register(name: str, fn, fake):
    """Register ``fn`` as the custom op ``acttail::name``; a second copy of this file (another checkpoint) reuses it.

    ``triton_op`` lets torch.compile see into the kernels; where it is missing (torch < 2.6) or the kernels run in Triton's
    interpreter (CPU tests), an opaque ``custom_op`` with a fake (shape-only) implementation takes its place.
    """
    namespace = torch.ops.acttail
    if hasattr(namespace, name):
        return getattr(namespace, name)
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is not None and os.environ.get("TRITON_INTERPRET") != "1":
        return triton_op(f"acttail::{name}", fn, mutates_args=())
    op = torch.library.custom_op(f"acttail::{name}", fn, mutates_args=())
    op.register_fake(fake)
    return op


topk_select = _register(
    "topk_select_v1", _topk_select, lambda x, ks: x.new_empty(x.shape[0], sum(ks), dtype=torch.int32))
sparse_gemv = _register(
    "sparse_gemv_v1", _sparse_gemv, lambda x, idx, weight_t, bias: x.new_empty(x.shape[0], weight_t.shape[1]))
