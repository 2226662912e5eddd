"""Triton decode kernels for activation sparsity: one launch per group of projections that read the same input.

A decode step of projection p computes ``y = W x_s`` where ``x_s`` keeps either the k largest-magnitude entries of x
(TopK mode, ranked as ``topk.py`` ranks them) or the entries with |x| > t (threshold mode, TEAL). With the weight stored
input-major (``weight_t = W^T``, ``[d_in, d_out]``) the kept entries select whole contiguous rows of ``weight_t``, so the
step reads only the kept fraction of the weight bytes. Projections reading one input (q/k/v, gate/up) are one
input-major ``weight_t`` whose column ranges are the members; each member keeps its own count or threshold.

A row's kept set is described by a *cut* ``(kth, cutoff)``: entry i is kept iff ``key_i > kth`` or
``key_i == kth and i <= cutoff``, where key is the magnitude's bit pattern (sign cleared). For TopK, kth is the k-th
largest key and cutoff the index of the last tie still kept (ties go to lower indices); for a threshold t, kth is the
key of t in x's dtype and cutoff is -1.

``sparse_gemv`` finds the TopK cut inside every GEMV program (``_topk_cut``: radix passes of 5 bits over the row held in
registers, with ``tl.histogram``), so selection costs no launch and no serial kernel in front of the GEMV; or it reads a
given cut (threshold mode, or ``topk_cut``'s output). Programs split the input rows (split-K) and the output columns; with
more than one split the fp32 partial sums meet in an fp32 buffer through atomic adds. A program reads its rows either
in masked tiles (skipped rows cost no bytes, but every tile costs a memory latency) or, compacted, first lists its kept
rows and then loads tiles of kept rows only (the number of latencies falls with the sparsity); the autotuner picks
per shape and sparsity.

Both are torch custom ops (``torch.library.triton_op``) so ``torch.compile`` and CUDA graphs capture a decode step. Their
names carry a hash of this file, so two checkpoints with different kernel files in one process each run their own.
Every loop is a plain ``range``: torch's analysis of which tensors a kernel writes walks every path of an unrolled
loop, which grows exponentially (``tests/test_kernel_compile.py``). Shipped flat inside every exported checkpoint;
``modeling_acttail.py`` imports this file inside try/except, so machines without Triton load the model and use another
path.
"""

import functools
import hashlib
import math
import os
from typing import NamedTuple

import torch

try:  # a try block keeps transformers' import check from requiring Triton; the modeling file catches the ImportError
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("Triton is not installed: the sparse decode kernels are unavailable") from error

__all__ = ["topk_cut", "sparse_gemv", "sparse_gemv_eager", "threshold_cut", "gemv_blocks", "MAX_MEMBERS", "INTERPRET"]

MAX_MEMBERS = 3  # projections sharing one input: q/k/v
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KEY_BITS = {torch.float16: 15, torch.bfloat16: 15, torch.float32: 31}  # magnitude bits of each dtype's pattern
# Ops are named after this file's content: a different copy (another checkpoint's) registers its own ops.
OP_SUFFIX = hashlib.sha256(open(__file__, "rb").read()).hexdigest()[:12]


@triton.jit
def _magnitude_keys(v, KEY_BITS: tl.constexpr):
    """The bits of v with the sign cleared, as int32: ordered like |v|, NaN above inf (as ``topk.magnitude_keys``)."""
    if KEY_BITS == 15:
        return v.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    else:
        return v.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _topk_cut(keys, valid, k, KEY_BITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """The cut ``(kth, cutoff)`` that keeps exactly the k largest-magnitude entries of a row (1 <= k <= D).

    kth is found digit by digit from the top, 5 bits a pass: a histogram of the next digit over the keys that share the
    digits found so far, and the largest digit whose count, with everything above it, still reaches k.

    Takes the row's keys, loaded by the caller: torch.compile's write analysis counts every pointer passed to a
    function whose result addresses a store as written, and the compacted GEMV's stores are addressed by the cut.
    """
    # 5 bits a pass: 32 bins, one per lane of a warp (a histogram costs about bins / 32 operations per entry)
    RADIX_BITS: tl.constexpr = 5
    NUM_BINS: tl.constexpr = 32
    NUM_PASSES: tl.constexpr = (KEY_BITS + 4) // 5
    offs = tl.arange(0, BLOCK_D)
    bins = tl.arange(0, NUM_BINS)
    kth = 0  # digits found so far, in place
    above = 0  # keys above every key that starts with those digits
    for p in range(NUM_PASSES):
        shift = (NUM_PASSES - 1 - p) * RADIX_BITS
        top = keys >> shift
        same_prefix = valid & ((top >> RADIX_BITS) == ((kth >> shift) >> RADIX_BITS))  # two shifts: each stays < 32
        hist = tl.histogram(top & (NUM_BINS - 1), NUM_BINS, mask=same_prefix)
        at_or_above = above + tl.cumsum(hist, 0, reverse=True)
        digit = tl.max(tl.where(at_or_above >= k, bins, 0), 0)
        above += tl.sum(tl.where(bins > digit, hist, 0), 0)
        kth = kth | (digit << shift)
    # Keys equal to kth fill the remaining k - above places, lowest index first. Usually all of them fit.
    tied = valid & (keys == kth)
    room = k - above
    cutoff = tl.full([], BLOCK_D, tl.int32)  # past every index: all ties kept
    if tl.sum(tied.to(tl.int32), 0) > room:
        rank = tl.cumsum(tied.to(tl.int32), 0)
        cutoff = tl.max(tl.where(tied & (rank <= room), offs, -1), 0)
    return kth, cutoff


@triton.jit(do_not_specialize=["k0", "k1", "k2"])  # one binary for every k: no compile per sparsity
def _topk_cut_kernel(
    x_ptr,  # [B, D] activations
    cut_ptr,  # [B, M, 2] int32 out: (kth, cutoff) per row and member
    D,  # entries per row
    stride_x,  # row stride of x
    k0,  # kept count of member 0
    k1,  # ... member 1
    k2,  # ... member 2
    KEY_BITS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= D: the row lives in registers
):
    row = tl.program_id(0)
    member = tl.program_id(1)
    k = tl.where(member == 0, k0, tl.where(member == 1, k1, k2))
    offs = tl.arange(0, BLOCK_D)
    keys = _magnitude_keys(tl.load(x_ptr + row * stride_x + offs, mask=offs < D, other=0), KEY_BITS)
    kth, cutoff = _topk_cut(keys, offs < D, k, KEY_BITS, BLOCK_D)
    members = tl.num_programs(1)
    tl.store(cut_ptr + (row * members + member) * 2, kth)
    tl.store(cut_ptr + (row * members + member) * 2 + 1, cutoff)


@triton.jit(do_not_specialize=["end0", "end1", "k0", "k1", "k2", "density"])
def _sparse_gemv_kernel(
    x_ptr,  # [B, D] activations
    wt_ptr,  # [D, N] input-major weight of every member, contiguous rows
    bias_ptr,  # [N] bias (read only if HAS_BIAS)
    out_ptr,  # [B, N] out: x's dtype, or a zeroed fp32 buffer if ATOMIC
    cut_ptr,  # [B or 1, M, 2] int32 (kth, cutoff) per row and member (read only if not FIND_CUT)
    scratch_ptr,  # int32, rows_per_split entries per program: its list of kept rows (COMPACT)
    D,  # input features
    N,  # output features, all members
    end0,  # first column after member 0
    end1,  # first column after member 1
    rows_per_split,  # input rows per split, a multiple of BLOCK_K
    stride_x,  # row stride of x
    stride_wt,  # row stride of wt
    stride_out,  # row stride of out
    stride_cut,  # row stride of cut (0: one cut for every row)
    k0,  # kept count of member 0 (FIND_CUT)
    k1,  # ... member 1
    k2,  # ... member 2
    density,  # kept eighths of the inputs, unused: a key of the autotuner, whose best tile depends on it
    FIND_CUT: tl.constexpr,  # True: find the TopK cut here; False: read it from cut_ptr
    HAS_BIAS: tl.constexpr,
    ATOMIC: tl.constexpr,  # several splits add into out (fp32)
    KEY_BITS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # power of two >= D (FIND_CUT)
    BLOCK_N: tl.constexpr,  # output columns per program; divides end0 and end1, so a program serves one member
    BLOCK_K: tl.constexpr,  # input rows per loaded tile
    COMPACT: tl.constexpr,  # True: list the kept rows first, then load BLOCK_K kept rows a tile; False: masked tiles
    BLOCK_C: tl.constexpr,  # entries listed at a time (COMPACT), a power of two
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    n_start = pid_n * BLOCK_N
    member = (n_start >= end0).to(tl.int32) + (n_start >= end1).to(tl.int32)
    x_row_ptr = x_ptr + row * stride_x
    if FIND_CUT:
        k = tl.where(member == 0, k0, tl.where(member == 1, k1, k2))
        offs_d = tl.arange(0, BLOCK_D)  # the whole row, in registers
        keys = _magnitude_keys(tl.load(x_row_ptr + offs_d, mask=offs_d < D, other=0), KEY_BITS)
        kth, cutoff = _topk_cut(keys, offs_d < D, k, KEY_BITS, BLOCK_D)
    else:
        kth = tl.load(cut_ptr + row * stride_cut + member * 2)
        cutoff = tl.load(cut_ptr + row * stride_cut + member * 2 + 1)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    split_start = split * rows_per_split
    split_end = tl.minimum(split_start + rows_per_split, D)
    if COMPACT:
        # A masked tile waits one memory latency however few of its rows are kept; a tile of kept rows only makes
        # the number of waits fall with the sparsity. The list lives in this program's part of scratch (L1 / L2).
        kept_rows_ptr = scratch_ptr + ((row * tl.num_programs(1) + split) * tl.num_programs(0) + pid_n) * rows_per_split
        count = 0
        for chunk_start in range(split_start, split_end, BLOCK_C):
            offs_c = chunk_start + tl.arange(0, BLOCK_C)
            key = _magnitude_keys(tl.load(x_row_ptr + offs_c, mask=offs_c < split_end, other=0), KEY_BITS)
            keep = ((offs_c < split_end) & ((key > kth) | ((key == kth) & (offs_c <= cutoff)))).to(tl.int32)
            tl.store(kept_rows_ptr + count + tl.cumsum(keep, 0) - 1, offs_c, mask=keep != 0)
            count += tl.sum(keep, 0)
        tl.debug_barrier()  # every thread wrote part of the list and reads other parts
        for tile_start in range(0, count, BLOCK_K):
            slots = tile_start + tl.arange(0, BLOCK_K)
            listed = slots < count
            offs_k = tl.load(kept_rows_ptr + slots, mask=listed, other=0)
            v = tl.load(x_row_ptr + offs_k, mask=listed, other=0)
            w = tl.load(wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :], mask=listed[:, None] & n_mask[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * v.to(tl.float32)[:, None]
    else:
        for tile_start in range(split_start, split_end, BLOCK_K):
            offs_k = tile_start + tl.arange(0, BLOCK_K)
            v = tl.load(x_row_ptr + offs_k, mask=offs_k < split_end, other=0)
            key = _magnitude_keys(v, KEY_BITS)
            keep = (offs_k < split_end) & ((key > kth) | ((key == kth) & (offs_k <= cutoff)))
            # Masked-off rows issue no memory traffic: only the kept rows of wt are read.
            w = tl.load(wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :], mask=keep[:, None] & n_mask[None, :],
                        other=0.0)
            acc += w.to(tl.float32) * tl.where(keep, v.to(tl.float32), 0.0)[:, None]
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        if split == 0:
            y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(out_ptr + row * stride_out + offs_n, y, mask=n_mask)
    else:
        tl.store(out_ptr + row * stride_out + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


# (BLOCK_K, num_warps) the autotuner tries, by element size, each masked and compacted. A tile of weights holds at
# most 32 KB (BLOCK_N = 128): a 64 KB fp32 tile spilled 40-48 bytes in Triton 3.6 (the GPU image's), and 4 warps spill
# with rows of 16384 entries held in registers (tests/test_kernel_compile.py allows ptxas at most 16 bytes of spills).
TILES = {2: ((32, 8), (64, 8), (64, 16), (128, 16)), 4: ((32, 8), (64, 8), (64, 16))}
PROGRAMS_PER_SM = 1  # every program finds its row's cut, so a second program on an SM doubles that work
LIST_CHUNK = 1024  # entries a compacted program lists at a time


def tile_config(block_k: int, num_warps: int, compact: bool):
    return triton.Config({"BLOCK_K": block_k, "COMPACT": compact}, num_warps=num_warps)


def _tile_configs(size: int) -> list:
    if INTERPRET:  # the interpreter cannot time: one tile (tests choose others)
        return [tile_config(32, 4, True)]
    # compacted first: torch.compile analyses which tensors the first config writes, and it writes the most (scratch)
    return [tile_config(block_k, warps, compact) for compact in (True, False) for block_k, warps in TILES[size]]


_sparse_gemv_tuned = {  # by element size
    size: triton.autotune(
        configs=_tile_configs(size), key=["D", "N", "rows_per_split", "FIND_CUT", "ATOMIC", "BLOCK_N", "density"],
        reset_to_zero=["out_ptr"],  # atomic adds need a zeroed buffer on every timed try (harmless for plain stores)
    )(_sparse_gemv_kernel)
    for size in (2, 4)
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv unwraps constexprs: microseconds a call, and eager steps count them


def gemv_blocks(widths: tuple[int, ...], d: int, rows: int, device: torch.device,
                programs_per_sm: int = 1) -> tuple[int, int, int]:
    """(BLOCK_N, splits, rows_per_split) for a group GEMV: BLOCK_N divides every member boundary; splits of the input
    rows fill the GPU (``programs_per_sm`` programs on each SM) when the output columns alone do not."""
    boundary = math.gcd(*(sum(widths[:i + 1]) for i in range(len(widths) - 1))) if len(widths) > 1 else 0
    block_n = 128
    while boundary % block_n:
        block_n //= 2
    n_blocks = _cdiv(sum(widths), block_n)
    # the interpreter: few programs, quick tests
    programs = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    # rows_per_split is a multiple of 128, the largest BLOCK_K, so every tile lies inside one split
    splits = max(1, min(round(programs * programs_per_sm / (n_blocks * rows)), _cdiv(d, 128)))
    rows_per_split = _cdiv(_cdiv(d, splits), 128) * 128
    return block_n, _cdiv(d, rows_per_split), rows_per_split


class _GemvPlan(NamedTuple):
    """Everything a group GEMV launch needs beyond its tensors, worked out once per shape (eager decode steps are
    launch-bound: this is Python time on every step)."""
    grid: tuple[int, int, int]
    scratch: int  # int32 entries of the compacted tiles' row lists
    ends: tuple[int, int]  # end0, end1
    rows_per_split: int
    counts: tuple[int, int, int]  # k0, k1, k2 (TopK), zeros for given cuts
    density: int
    atomic: bool
    block_d: int
    block_n: int
    block_c: int


@functools.lru_cache(maxsize=1024)
def _gemv_plan(widths: tuple[int, ...], ks: tuple[int, ...] | None, d: int, rows: int, device: torch.device,
               kept_fraction: float, programs_per_sm: int) -> _GemvPlan:
    """The plan for TopK counts ``ks`` (the cut found in the kernel), or for given cuts (``ks`` None)."""
    assert 1 <= len(widths) <= MAX_MEMBERS, f"1 to {MAX_MEMBERS} members, got {len(widths)}"
    if ks is not None:
        assert len(ks) == len(widths) and all(1 <= k <= d for k in ks), f"bad ks {ks} for d={d}"
    ks = ks or ()
    block_n, splits, rows_per_split = gemv_blocks(widths, d, rows, device, programs_per_sm)
    n = sum(widths)
    grid = (_cdiv(n, block_n), splits, rows)
    ends = [sum(widths[:i + 1]) for i in range(len(widths))] + [n] * MAX_MEMBERS
    density = round(8 * (max(ks) / d if ks else kept_fraction))
    return _GemvPlan(grid=grid, scratch=math.prod(grid) * rows_per_split, ends=(ends[0], ends[1]),
                     rows_per_split=rows_per_split, counts=tuple((list(ks) + [0] * MAX_MEMBERS)[:MAX_MEMBERS]),
                     density=density, atomic=splits > 1, block_d=1 << (d - 1).bit_length(), block_n=block_n,
                     block_c=min(LIST_CHUNK, 1 << (rows_per_split - 1).bit_length()))


def _launch(kernel):
    """The kernel as torch.compile can trace it (``wrap_triton``); outside tracing it launches as usual."""
    wrap = getattr(torch.library, "wrap_triton", None)
    return wrap(kernel) if wrap is not None and not INTERPRET else kernel


def _check_rows(x: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(-1) == 1, f"x must be [B, D] with contiguous rows, got {tuple(x.shape)} {x.stride()}"
    assert x.dtype in KEY_BITS, f"unsupported dtype {x.dtype}"


def cut_kernel_warps(block_d: int) -> int:
    """Warps of the separate cut kernel: up to 16, so a row of 16384 entries is 32 registers a thread."""
    return max(4, min(16, block_d // 512))


def _topk_cut_impl(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """The TopK cut of each row for each member's k: int32 ``[B, len(ks), 2]`` (see the module docstring)."""
    _check_rows(x)
    assert 1 <= len(ks) <= MAX_MEMBERS and all(1 <= k <= x.shape[1] for k in ks), f"bad ks {ks} for d={x.shape[1]}"
    rows, d = x.shape
    cut = torch.empty(rows, len(ks), 2, dtype=torch.int32, device=x.device)
    block_d = triton.next_power_of_2(d)
    _launch(_topk_cut_kernel)[(rows, len(ks))](
        x, cut, d, x.stride(0), *(list(ks) + [0] * MAX_MEMBERS)[:MAX_MEMBERS], KEY_BITS=KEY_BITS[x.dtype], BLOCK_D=block_d,
        num_warps=cut_kernel_warps(block_d))
    return cut


def threshold_cut(thresholds: list[float], dtype: torch.dtype, device) -> torch.Tensor:
    """The cut of a threshold per member, for every row: int32 ``[1, M, 2]``; keeps |x| > t (t rounded to dtype as the
    torch reference compares it) and NaN."""
    # imported here, not above: tests/sm90_report.py loads this file alone, without its package
    from .topk import magnitude_keys

    keys = magnitude_keys(torch.tensor(thresholds, dtype=dtype)).to(torch.int32)
    return torch.stack([keys, torch.full_like(keys, -1)], dim=-1)[None].to(device)


def _sparse_gemv_impl(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, widths: list[int],
                      ks: list[int], cut: torch.Tensor | None, kept_fraction: float) -> torch.Tensor:
    """``y[b] = x_s[b] @ weight_t + bias`` for every member at once, reading only the kept rows of ``weight_t``.

    :param x: ``[B, D]`` activations, contiguous rows
    :param weight_t: ``[D, N]`` input-major weight, the members' columns side by side (``sum(widths) == N``)
    :param bias: ``[N]`` or None
    :param widths: output columns of each member (1 to 3)
    :param ks: kept count of each member (TopK; the cut is found in the kernel); ignored when ``cut`` is given
    :param cut: int32 ``[B or 1, M, 2]`` given cuts (threshold mode, or :func:`topk_cut`), or None
    :param kept_fraction: the fraction of inputs a given cut is expected to keep (TopK: ``max(ks) / D`` is used); the
        autotuner keeps a tile per eighth, as masked or compacted tiles win at different sparsities
    :returns: ``[B, N]`` in x's dtype, accumulated in fp32
    """
    _check_rows(x)
    rows, d = x.shape
    n = weight_t.shape[1]
    assert weight_t.shape[0] == d and n == sum(widths) and weight_t.stride(-1) == 1 and weight_t.dtype == x.dtype, (
        f"weight_t must be input-major [{d}, {sum(widths)}] {x.dtype} with contiguous rows, got {tuple(weight_t.shape)}")
    find_cut = cut is None
    assert find_cut or (cut.dtype == torch.int32 and cut.shape[1:] == (len(widths), 2) and cut.shape[0] in (1, rows))
    plan = _gemv_plan(tuple(widths), tuple(ks) if find_cut else None, d, rows, x.device, kept_fraction, PROGRAMS_PER_SM)
    out = torch.zeros(rows, n, dtype=torch.float32, device=x.device) if plan.atomic else \
        torch.empty(rows, n, dtype=x.dtype, device=x.device)
    scratch = torch.empty(plan.scratch, dtype=torch.int32, device=x.device)  # the compacted tiles' row lists
    _launch(_sparse_gemv_tuned[x.element_size()])[plan.grid](
        x, weight_t, bias if bias is not None else x, out, x if find_cut else cut, scratch,
        d, n, *plan.ends, plan.rows_per_split, x.stride(0), weight_t.stride(0), out.stride(0),
        0 if find_cut or cut.shape[0] == 1 else cut.stride(0), *plan.counts, plan.density,
        FIND_CUT=find_cut, HAS_BIAS=bias is not None, ATOMIC=plan.atomic, KEY_BITS=KEY_BITS[x.dtype],
        BLOCK_D=plan.block_d, BLOCK_N=plan.block_n, BLOCK_C=plan.block_c,
    )
    return out.to(x.dtype) if plan.atomic else out


def _register(name: str, fn, fake):
    """Register ``fn`` as the custom op ``acttail::<name>_<hash of this file>``.

    ``triton_op`` lets torch.compile see into the kernels; in Triton's interpreter (CPU tests), or where torch has no
    triton_op, an opaque ``custom_op`` with a fake (shape-only) implementation takes its place.
    """
    qualified = f"acttail::{name}_{OP_SUFFIX}"
    namespace = torch.ops.acttail
    if hasattr(namespace, f"{name}_{OP_SUFFIX}"):  # this very file imported twice (module cache cleared)
        return getattr(namespace, f"{name}_{OP_SUFFIX}")
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is not None and not INTERPRET:
        return triton_op(qualified, fn, mutates_args=())  # its fake runs fn itself, launching nothing
    op = torch.library.custom_op(qualified, fn, mutates_args=())
    op.register_fake(fake)
    return op


topk_cut = _register(
    "topk_cut", _topk_cut_impl, lambda x, ks: x.new_empty(x.shape[0], len(ks), 2, dtype=torch.int32))
# Outside torch.compile the op's dispatch only adds microseconds to a launch-bound eager decode step: call it directly.
sparse_gemv_eager = _sparse_gemv_impl
sparse_gemv = _register(
    "sparse_gemv", _sparse_gemv_impl,
    lambda x, weight_t, bias, widths, ks, cut, kept_fraction: x.new_empty(x.shape[0], weight_t.shape[1]))
