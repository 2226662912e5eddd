"""CPU decode path for activation sparsity: one GEMV per group of projections that read the same input (q/k/v,
gate/up, o, down), reading only the kept rows of the members' input-major weight ``[d_in, sum(d_out)]``, in place.

The GEMV is torch's ``embedding_bag`` (sum mode, per-sample weights: ``sum_i x_i * table[i]``, FBGEMM's JIT kernels,
float32 sums for bfloat16 / float16 tables). Its bags run in parallel on torch's own thread pool, so the sparse path
uses every core that dense ``F.linear`` uses and no second thread pool competes with torch's. To give every thread a
share, the weight's columns are cut into ``chunks`` blocks of ``width`` columns: ``weight_t.view(d_in * chunks,
width)`` is the same memory, and its row ``i * chunks + c`` is column block c of input i. A row's kept inputs then make
one bag per column block, and the ``[rows * chunks, width]`` output is the ``[rows, sum(d_out)]`` result, no copy.

The bags (which inputs each row keeps for each member, as table rows, with their values) come from one numba call
per step (:func:`_fill_bags`: exact TopK cut per member, ties to the lower index as ``topk.topk_order``, or a
threshold), or, without numba, from torch ops. Where one thread does the work better (on up to
``DIRECT_MAX_THREADS`` torch threads or up to ``DIRECT_MAX_BYTES``), one numba call selects and sums the kept rows
itself (:func:`_gemv_direct`; bfloat16 / float16 as words of two columns widened in registers,
:func:`_gemv_direct_pairs`), with no bags and none of embedding_bag's per-entry cost. Prompts and large batches take
the masked path's dense GEMM (:func:`masked_gemm_cpu`). Shipped flat inside every exported checkpoint; needs only torch
(numba and numpy are optional).
"""

import math
import os
import platform
import sys
import threading

import torch
import torch.nn.functional as F

from .topk import KEY_TYPES, magnitude_keys, topk_mask

try:  # optional fast path; the try block also keeps transformers' remote-code import check from requiring numba
    import numba
    import numpy as np
    from llvmlite import binding, ir
    from numba.core import config as numba_config
    from numba.extending import intrinsic
except ImportError:
    numba = None

__all__ = ["GemvPlan", "sparse_gemv_cpu", "gemv_bags", "kept_masks", "masked_gemm_cpu", "DTYPES"]

USE_NUMBA = numba is not None and os.environ.get("ACTTAIL_NUMBA", "1") != "0"  # tests flip it to run the torch path
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)  # embedding_bag's table dtypes
# Float32 / float64 weights take the direct GEMV (one numba call, on the calling thread) when torch has at most
# DIRECT_MAX_THREADS threads, or at any thread count up to DIRECT_MAX_BYTES; else embedding_bag spreads the kept rows
# over torch's threads. Measured on the 2-core AMD machine (BENCHMARKS.md): since it sums eight kept rows a pass, the
# direct GEMV on one thread matched or beat embedding_bag on two at batch 1 at SmolLM2, 1.1B and 7B shapes (down_proj
# aside, within 15%; one core there reads memory about as fast as two); with more cores embedding_bag's threads read
# more of a large weight at once.
DIRECT_MAX_THREADS = 2
DIRECT_MAX_BYTES = 4 * 2**20
# bfloat16 / float16 weights too, as words of two (:func:`_gemv_direct_pairs`), where a member's columns pair up
DIRECT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# torch's 16-bit GEMMs on CPU go to oneDNN only where the CPU has them (AVX-512 / AMX); elsewhere its loop on an
# input-major weight is 15-70x slower than on [out, in] (AMD machine, AVX2), so the masked path widens to float32
NATIVE_HALF_GEMM = {dtype: bool(getattr(torch.ops.mkldnn, name, lambda: False)()) for dtype, name in (
    (torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported"))}
WIDEN_BLOCK_BYTES = 2 * 2**20  # float32 weight rows widened at a time by the masked path (cache-resident)
MIN_WIDTH = 16  # narrowest column block: below it the per-bag overhead outweighs the parallelism
BLOCKS_PER_THREAD = 2  # column blocks per thread: some balance between members of different k (SmolLM2 decode: 2 beat 1, 4 and 8)

if numba is not None:
    _KEY_BITS = {torch.float32: np.int32, torch.float64: np.int64, torch.bfloat16: np.int16, torch.float16: np.int16}
    # a 16-bit weight table read as 32-bit words, two columns a word; the word's type says which float it holds
    _PAIR_WORDS = {torch.bfloat16: np.uint32, torch.float16: np.int32}

    def _native_half() -> bool:
        """Whether numba compiles for a CPU that widens float16 in hardware (x86's F16C; aarch64): there LLVM's
        ``fpext`` from half is one instruction, elsewhere a call to a helper that numba's JIT cannot link."""
        if numba_config.CPU_NAME is None:  # the host
            return platform.machine().lower() in ("aarch64", "arm64") or \
                bool(binding.get_host_cpu_features().get("f16c", False))
        return "+f16c" in (numba_config.CPU_FEATURES or "")

    def _widen(high: bool):
        """Codegen of one 16-bit half of a 32-bit word widened to float32, exactly (``high``: the upper half, the odd
        column; little-endian). A uint32 word holds two bfloat16, whose bits are float32's upper half: a shift or a
        mask. An int32 word holds two float16: ``fpext`` where the CPU has it (:func:`_native_half`), else integer
        operations and selects (1.7x slower than fpext at 7B shapes): a normal number's exponent is rebased, a
        subnormal one is its 10-bit mantissa times 2^-24, inf and NaN keep their mantissa under float32's top
        exponent, and the sign is put back last."""
        def codegen(context, builder, signature, args):
            (word,) = args
            const = lambda value: ir.Constant(word.type, value)  # noqa: E731
            if signature.args[0] == numba.types.uint32:
                bits = builder.and_(word, const(0xFFFF0000)) if high else builder.shl(word, const(16))
                return builder.bitcast(bits, ir.FloatType())
            if _native_half():
                half = builder.trunc(builder.lshr(word, const(16)) if high else word, ir.IntType(16))
                return builder.fpext(builder.bitcast(half, ir.HalfType()), ir.FloatType())
            half = builder.and_(builder.lshr(word, const(16)) if high else word, const(0xFFFF))
            magnitude = builder.and_(half, const(0x7FFF))
            shifted = builder.shl(magnitude, const(13))
            normal = builder.add(shifted, const((127 - 15) << 23))
            special = builder.or_(shifted, const(0x7F800000))  # inf / NaN
            bits = builder.select(builder.icmp_unsigned(">=", magnitude, const(0x7C00)), special, normal)
            subnormal = builder.fmul(builder.sitofp(magnitude, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0**-24))
            value = builder.select(builder.icmp_unsigned("<", magnitude, const(0x0400)),
                                   builder.bitcast(subnormal, word.type), bits)
            sign = builder.shl(builder.and_(half, const(0x8000)), const(16))
            return builder.bitcast(builder.or_(value, sign), ir.FloatType())
        return codegen

    @intrinsic
    def _even(typingctx, word):
        """The word's even column (its lower half) as float32."""
        if word in (numba.types.uint32, numba.types.int32):
            return numba.types.float32(word), _widen(high=False)

    @intrinsic
    def _odd(typingctx, word):
        """The word's odd column (its upper half) as float32."""
        if word in (numba.types.uint32, numba.types.int32):
            return numba.types.float32(word), _widen(high=True)

    def _jit(function):
        try:  # compiled once, then loaded from numba's on-disk cache
            return numba.njit(cache=True, nogil=True)(function)
        except RuntimeError:  # no writable cache directory: compile in every process
            return numba.njit(nogil=True)(function)

    @_jit
    def _topk_cut(keys, hist, top, shift, k, bin_keys):
        """``(cut, ties)``: the k-th largest of ``keys`` and how many keys equal to it are kept (the lowest-index ones).
        The cut's bin comes from the histogram of the keys' top bits (``key >> shift``), then ``np.partition`` among
        the few keys in that bin: about half the time of a quickselect over the row, whose comparisons are coin flips
        to the branch predictor."""
        above, t = 0, top >> shift  # bins above t hold ``above`` keys, fewer than k; bin t completes k
        while above + hist[t] < k:
            above += hist[t]
            t -= 1
        c = 0
        for i in range(keys.shape[0]):
            if keys[i] >> shift == t:
                bin_keys[c] = keys[i]
                c += 1
        p = c - (k - above)  # the k-th largest key overall is the (k - above)-th largest in bin t
        in_bin = np.partition(bin_keys[:c], p)
        cut = in_bin[p]
        ties = k - above
        for i in range(p + 1, c):
            ties -= in_bin[i] > cut
        return cut, ties

    @_jit
    def _rank_row(bits, b, mask, keys, hist, shift):
        """Row b's keys (``bits & mask``) and the histogram of their top bits; returns the largest key."""
        hist[:] = 0
        top = 0
        for i in range(bits.shape[1]):
            keys[i] = bits[b, i] & mask
            hist[keys[i] >> shift] += 1
            top = max(top, keys[i])
        return top

    @_jit
    def _kept_inputs(keys, hist, top, shift, k, cut, lo, bin_keys, kept):
        """The inputs in ``lo:lo + len(kept)`` that a member keeps, as local indices, ascending, into ``kept``;
        returns how many. k: its TopK count (k >= d keeps all), or -1 to keep the keys above ``cut`` (threshold)."""
        ties = 0
        if k >= keys.shape[0]:
            cut = -1
        elif k >= 0:
            cut, ties = _topk_cut(keys, hist, top, shift, k, bin_keys)
        count = 0
        for i in range(keys.shape[0]):
            if keys[i] > cut or (keys[i] == cut and ties > 0):
                ties -= keys[i] == cut
                if lo <= i < lo + kept.shape[0]:
                    kept[count] = i - lo
                    count += 1
        return count

    @_jit
    def _kept_sets(bits, members, lo, d_local):
        """Every row's kept inputs per member: ``(kept, counts)``, ``kept[b, m, :counts[b, m]]`` the inputs in
        ``lo:lo + d_local`` that member m keeps in row b, as local indices, ascending. The one selection that the
        bags, the direct GEMV and the masks all read.

        :param bits: ``[rows, d]`` the input ranked (the whole input under tensor parallel), as signed integers
        :param members: per member m, ``(k, cut, first block, end block)``: k its TopK count, or -1 to keep the keys
            above ``cut`` (threshold mode); it owns column blocks ``first:end``. Last row: ``(mask, shift, 0, 0)``
        :param lo: the local inputs are ``lo:lo + d_local`` of ``bits``; kept inputs outside them are another rank's
        """
        rows, d, (mask, shift) = bits.shape[0], bits.shape[1], members[-1, :2]
        keys, bin_keys = np.empty(d, np.int64), np.empty(d, np.int64)
        kept = np.empty((rows, members.shape[0] - 1, d_local), np.int64)
        counts = np.empty((rows, members.shape[0] - 1), np.int64)
        hist = np.zeros((mask >> shift) + 1, np.int32)
        for b in range(rows):
            top = _rank_row(bits, b, mask, keys, hist, shift)
            for m in range(members.shape[0] - 1):
                counts[b, m] = _kept_inputs(keys, hist, top, shift, members[m, 0], members[m, 1], lo, bin_keys,
                                            kept[b, m])
        return kept, counts

    @_jit
    def _fill_bags(bits, x, members, lo, idx, values, offsets):
        """Every row's bags, in order (row, column block): the table rows ``i * chunks + c`` of the inputs i that
        member m(c) keeps (:func:`_kept_sets`), ascending, with x's values; returns how many entries were written.
        ``x``: ``[rows, d_local]`` the values (as bits for halves: they are copied, never computed on)."""
        kept, counts = _kept_sets(bits, members, lo, x.shape[1])
        chunks, n = members[-2, 3], 0
        for b in range(bits.shape[0]):
            for m in range(members.shape[0] - 1):
                for c in range(members[m, 2], members[m, 3]):
                    offsets[b * chunks + c] = n
                    for t in range(counts[b, m]):
                        idx[n] = kept[b, m, t] * chunks + c
                        values[n] = x[b, kept[b, m, t]]
                        n += 1
        return n

    @_jit
    def _gemv_direct(bits, x, w, members, lo, width, out):
        """``out[b, member m's columns] = sum over the inputs i that m keeps in row b (:func:`_kept_sets`) of
        x[b, i] * w[i, those columns]``, summed on the calling thread in out's dtype, eight ascending inputs a pass.
        ``w``: ``[d_local, sum(widths)]``; member m owns columns ``first * width : end * width``."""
        kept, counts = _kept_sets(bits, members, lo, x.shape[1])
        acc = np.empty(w.shape[1], out.dtype)  # contiguous, so that the inner loop vectorizes
        for b in range(bits.shape[0]):
            for m in range(members.shape[0] - 1):
                start, n = members[m, 2] * width, (members[m, 3] - members[m, 2]) * width
                acc[:n] = 0
                rows_kept, c, t = kept[b, m], counts[b, m], 0
                # eight kept rows a pass: an eighth of the accumulator's loads and stores, and eight streams of weight
                # rows in flight for the prefetchers (15-35% faster than one row a pass on the AMD machine)
                while t + 8 <= c:
                    i0, i1, i2, i3 = rows_kept[t], rows_kept[t + 1], rows_kept[t + 2], rows_kept[t + 3]
                    i4, i5, i6, i7 = rows_kept[t + 4], rows_kept[t + 5], rows_kept[t + 6], rows_kept[t + 7]
                    a0, a1, a2, a3, a4, a5, a6, a7 = x[b, i0], x[b, i1], x[b, i2], x[b, i3], x[b, i4], x[b, i5], \
                        x[b, i6], x[b, i7]
                    r0, r1, r2, r3 = w[i0][start:], w[i1][start:], w[i2][start:], w[i3][start:]
                    r4, r5, r6, r7 = w[i4][start:], w[i5][start:], w[i6][start:], w[i7][start:]
                    for j in range(n):  # contiguous rows: the loop vectorizes
                        acc[j] += ((a0 * r0[j] + a1 * r1[j]) + (a2 * r2[j] + a3 * r3[j])) + \
                            ((a4 * r4[j] + a5 * r5[j]) + (a6 * r6[j] + a7 * r7[j]))
                    t += 8
                for t in range(t, c):
                    xi, row = x[b, rows_kept[t]], w[rows_kept[t]][start:]
                    for j in range(n):
                        acc[j] += xi * row[j]
                out[b, start:start + n] = acc[:n]

    @_jit
    def _gemv_direct_pairs(bits, x, w, members, lo, width, out):
        """:func:`_gemv_direct` for bfloat16 / float16 weights: ``w`` ``[d_local, sum(widths) / 2]``, words of two
        columns (:data:`_PAIR_WORDS`), widened to float32 as they are read; x and ``out`` float32. Even and odd
        columns sum apart, so that the loop vectorizes, and are interleaved at the end."""
        kept, counts = _kept_sets(bits, members, lo, x.shape[1])
        even, odd = np.empty(w.shape[1], np.float32), np.empty(w.shape[1], np.float32)
        for b in range(bits.shape[0]):
            for m in range(members.shape[0] - 1):
                start, n = members[m, 2] * width // 2, (members[m, 3] - members[m, 2]) * width // 2
                even[:n], odd[:n] = 0, 0
                rows_kept, c, t = kept[b, m], counts[b, m], 0
                while t + 8 <= c:  # eight kept rows a pass, as _gemv_direct
                    i0, i1, i2, i3 = rows_kept[t], rows_kept[t + 1], rows_kept[t + 2], rows_kept[t + 3]
                    i4, i5, i6, i7 = rows_kept[t + 4], rows_kept[t + 5], rows_kept[t + 6], rows_kept[t + 7]
                    a0, a1, a2, a3, a4, a5, a6, a7 = x[b, i0], x[b, i1], x[b, i2], x[b, i3], x[b, i4], x[b, i5], \
                        x[b, i6], x[b, i7]
                    r0, r1, r2, r3 = w[i0][start:], w[i1][start:], w[i2][start:], w[i3][start:]
                    r4, r5, r6, r7 = w[i4][start:], w[i5][start:], w[i6][start:], w[i7][start:]
                    for j in range(n):
                        v0, v1, v2, v3, v4, v5, v6, v7 = r0[j], r1[j], r2[j], r3[j], r4[j], r5[j], r6[j], r7[j]
                        even[j] += ((a0 * _even(v0) + a1 * _even(v1)) + (a2 * _even(v2) + a3 * _even(v3))) + \
                            ((a4 * _even(v4) + a5 * _even(v5)) + (a6 * _even(v6) + a7 * _even(v7)))
                        odd[j] += ((a0 * _odd(v0) + a1 * _odd(v1)) + (a2 * _odd(v2) + a3 * _odd(v3))) + \
                            ((a4 * _odd(v4) + a5 * _odd(v5)) + (a6 * _odd(v6) + a7 * _odd(v7)))
                    t += 8
                for t in range(t, c):
                    xi, row = x[b, rows_kept[t]], w[rows_kept[t]][start:]
                    for j in range(n):
                        even[j] += xi * _even(row[j])
                        odd[j] += xi * _odd(row[j])
                out[b, 2 * start:2 * (start + n):2] = even[:n]
                out[b, 2 * start + 1:2 * (start + n):2] = odd[:n]

    @_jit
    def _fill_masks(bits, members, lo, masks):
        """``masks[m, b, i]``: whether member m keeps input ``lo + i`` of row b (the selection of
        :func:`_kept_sets`, one row at a time: a prompt's rows are many, and every row's int64 kept sets at once
        would take 8x the masks' memory, 200 MB for a 2048-token prompt at a 7B model's q/k/v)."""
        d, (mask, shift) = bits.shape[1], members[-1, :2]
        keys, bin_keys, kept = np.empty(d, np.int64), np.empty(d, np.int64), np.empty(masks.shape[2], np.int64)
        hist = np.zeros((mask >> shift) + 1, np.int32)
        masks[:] = False
        for b in range(bits.shape[0]):
            top = _rank_row(bits, b, mask, keys, hist, shift)
            for m in range(members.shape[0] - 1):
                for t in range(_kept_inputs(keys, hist, top, shift, members[m, 0], members[m, 1], lo, bin_keys, kept)):
                    masks[m, b, kept[t]] = True


class GemvPlan:
    """How one group's decode GEMV runs (see :func:`sparse_gemv_cpu`): the column blocks of its ``[d_in,
    sum(widths)]`` weight, which member owns each, and the bag buffers, reused from step to step.

    :param widths: each member's d_out (its columns, in order)
    :param ks: TopK mode: each member's count of the (whole) input; threshold mode: None
    :param thresholds: threshold mode: each member's threshold (keep |x| > t, and NaN); TopK mode: None
    :param threads: torch's threads, which run the bags: each gets ``BLOCKS_PER_THREAD`` column blocks
    """

    def __init__(self, widths: list[int], ks: list[int] | None, thresholds: list[float] | None, dtype: torch.dtype,
                 threads: int | None = None):
        self.widths, self.ks, self.thresholds, self.dtype = list(widths), ks, thresholds, dtype
        self.threads = threads or torch.get_num_threads()
        self.width = _block_width(self.widths, self.threads)
        owned = [w // self.width for w in self.widths]
        ends = [sum(owned[:m + 1]) for m in range(len(owned))]
        self.chunks = ends[-1]
        self.owner = [m for m, count in enumerate(owned) for _ in range(count)]  # the member of each block
        self.entries = None if ks is None else sum(ks[m] for m in self.owner)  # bag entries of a row, TopK mode
        # (rows, entries) -> (idx, values, offsets) and their numpy views, per thread: embedding_bag reads them
        # without the GIL, so two threads decoding through one plan would overwrite each other's bags
        self.local = threading.local()
        self.compiled = USE_NUMBA and dtype in _KEY_BITS  # bags and masks from numba; else from torch ops
        # the direct GEMV can serve it (see DIRECT_MAX_BYTES); 16-bit weights: every member whole words (even widths),
        # in the little-endian order the word halves assume
        self.direct = self.compiled and dtype in DIRECT_DTYPES and (
            dtype not in _PAIR_WORDS or (all(w % 2 == 0 for w in self.widths) and sys.byteorder == "little"))
        if self.compiled:
            self.bits, mask = _KEY_BITS[dtype], KEY_TYPES[dtype][1]
            cuts = [0] * len(owned) if thresholds is None else \
                [int(magnitude_keys(torch.tensor([t], dtype=dtype))) for t in thresholds]
            self.members = np.array([[ks[m] if ks is not None else -1, cuts[m], ends[m] - owned[m], ends[m]]
                                     for m in range(len(owned))] + [[mask, max(0, mask.bit_length() - 11), 0, 0]],
                                    dtype=np.int64)  # the histogram bins the keys' top 11 bits

    def bags(self, rows: int, entries: int):
        """Buffers for ``rows`` rows of at most ``entries`` entries each (kept while the shape recurs)."""
        key = (rows, entries)
        buffers = self.local.__dict__.setdefault("buffers", {})
        if key not in buffers:
            idx = torch.empty(rows * entries, dtype=torch.int32)
            values = torch.empty(rows * entries, dtype=self.dtype)
            offsets = torch.empty(rows * self.chunks, dtype=torch.int32)
            buffers[key] = (idx, values, offsets), (_np(idx), _np(values), _np(offsets))
        return buffers[key]


def _block_width(widths: list[int], threads: int) -> int:
    """The widest column block that divides every member's width and still gives each thread BLOCKS_PER_THREAD
    blocks of the group (at least MIN_WIDTH columns, else one block per member)."""
    common = math.gcd(*widths)
    target = max(MIN_WIDTH, sum(widths) // (BLOCKS_PER_THREAD * threads))
    fitting = [w for w in range(MIN_WIDTH, min(common, target) + 1) if common % w == 0]
    return max(fitting) if fitting else common


def _torch_only(*tensors: torch.Tensor | None) -> bool:
    """Whether this call must stay in torch ops: torch.compile is tracing it, or autograd must see it (no backward here)."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _np(t: torch.Tensor):
    """A numpy view, no copy (a parameter requires grad even in no_grad); bfloat16 / float16 as int16 bit patterns."""
    t = t.detach() if t.requires_grad else t
    return t.view(torch.int16).numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()


def _kept_mask_torch(plan: GemvPlan, ranked: torch.Tensor, m: int, lo: int, d_local: int) -> torch.Tensor:
    """Without numba: ``[rows, d_local]`` whether member m keeps each input in ``lo:lo + d_local``."""
    if plan.ks is not None:
        keep = topk_mask(ranked, plan.ks[m]) if plan.ks[m] < ranked.shape[1] else torch.ones_like(ranked, dtype=torch.bool)
    else:
        keep = ~(ranked.abs() <= plan.thresholds[m])
    return keep[:, lo:lo + d_local]


def _kept_torch(plan: GemvPlan, ranked: torch.Tensor, m: int, lo: int, d_local: int) -> list[torch.Tensor]:
    """Without numba: each row's kept inputs of member m that lie in ``lo:lo + d_local``, local and ascending."""
    return [row.nonzero().view(-1) for row in _kept_mask_torch(plan, ranked, m, lo, d_local)]


def _bags_torch(plan: GemvPlan, x: torch.Tensor, ranked: torch.Tensor, lo: int):
    """The bags of :func:`_fill_bags`, built with torch ops (no numba)."""
    rows, d_local = x.shape
    kept = [_kept_torch(plan, ranked, m, lo, d_local) for m in range(len(plan.widths))]
    idx, values, sizes = [], [], []
    for b in range(rows):
        for c in range(plan.chunks):
            member_kept = kept[plan.owner[c]][b]
            idx.append(member_kept * plan.chunks + c)
            values.append(x[b, member_kept])
            sizes.append(member_kept.numel())
    offsets = torch.tensor([0] + sizes[:-1], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return torch.cat(idx).int(), torch.cat(values), offsets


def _reference(x, weight_t, plan, bias, x_full, offset):
    """Mask + dense matmul per member, in torch ops alone (autograd and torch.compile)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    y = torch.cat([torch.where(mask, x, zero) @ part
                   for mask, part in zip(kept_masks(plan, x, x_full, offset), weight_t.split(plan.widths, dim=1))], -1)
    return y if bias is None else y + bias


def sparse_gemv_cpu(x: torch.Tensor, weight_t: torch.Tensor, plan: GemvPlan, bias: torch.Tensor | None = None,
                    x_full: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Every member's output of one decode step, side by side: ``y[b, member m] = sum over kept i of x[b, i] *
    weight_t[i, m's columns] (+ bias)``, reading only the kept rows of ``weight_t``.

    :param x: ``[rows, d_in]`` activations, in the plan's dtype
    :param weight_t: ``[d_in, sum(widths)]`` the members' weights, input-major and contiguous, in the plan's dtype
    :param plan: the group's :class:`GemvPlan` (members, their counts or thresholds)
    :param bias: ``[sum(widths)]`` or None
    :param x_full: tensor parallel, TopK mode: the whole input, of which x is the shard starting at ``offset``
    :returns: ``[rows, sum(widths)]`` in x's dtype (float32 sums for bfloat16 / float16; a bias is added after
        the sum is rounded to x's dtype, except on the direct GEMV of 16-bit weights, which adds it in float32)
    """
    if _torch_only(x, weight_t, bias):
        return _reference(x, weight_t, plan, bias, x_full, offset)
    if x.shape[0] == 0:  # an empty step: nothing to select
        y = x.new_empty(0, weight_t.shape[1])
        return y if bias is None else y + bias
    if plan.direct and (plan.threads <= DIRECT_MAX_THREADS
                        or weight_t.numel() * weight_t.element_size() <= DIRECT_MAX_BYTES):
        bits = _np(x if x_full is None else x_full).view(plan.bits)
        if plan.dtype in _PAIR_WORDS:  # float32 sums (and bias), rounded once to x's dtype
            y = torch.empty(x.shape[0], weight_t.shape[1], dtype=torch.float32)
            words = _np(weight_t).view(_PAIR_WORDS[plan.dtype])
            _gemv_direct_pairs(bits, x.float().numpy(), words, plan.members, offset, plan.width, y.numpy())
            return (y if bias is None else y.add_(bias)).to(x.dtype)
        y = torch.empty(x.shape[0], weight_t.shape[1], dtype=x.dtype)
        _gemv_direct(bits, _np(x), _np(weight_t), plan.members, offset, plan.width, y.numpy())
        return y if bias is None else y + bias
    idx, values, offsets = gemv_bags(plan, x, x_full, offset)
    table = weight_t.detach().view(weight_t.shape[0] * plan.chunks, plan.width)
    # torch.embedding_bag, not F.embedding_bag: the same op without its Python checks, a few us a call
    y = torch.embedding_bag(table, idx, offsets, False, 0, False, values, False, None)[0].view(x.shape[0], -1)
    return y if bias is None else y + bias


def masked_gemm_cpu(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight_t (+ bias)``: the dense GEMM of the masked path (prompts, large batches), on one member's columns
    of an input-major weight. A 16-bit weight without a native 16-bit GEMM (:data:`NATIVE_HALF_GEMM`) runs as float32
    GEMMs over blocks of weight rows, each widened just before use (no float32 copy of the whole weight), summed with
    the bias in float32 and rounded once to x's dtype.

    :param x: ``[rows, d_in]``
    :param weight_t: ``[d_in, d_out]``, rows contiguous (a column slice of a group's weight is)
    """
    if not x.is_cpu or x.dtype not in NATIVE_HALF_GEMM or NATIVE_HALF_GEMM[x.dtype] or _torch_only(x, weight_t, bias):
        return F.linear(x, weight_t.t(), bias)
    x32, step = x.float(), max(1, WIDEN_BLOCK_BYTES // (4 * weight_t.shape[1]))
    y = torch.zeros(x.shape[0], weight_t.shape[1]) if bias is None else bias.float().expand(x.shape[0], -1).clone()
    for start in range(0, weight_t.shape[0], step):
        y.addmm_(x32[:, start:start + step], weight_t[start:start + step].float())
    return y.to(x.dtype)


def kept_masks(plan: GemvPlan, x: torch.Tensor, x_full: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """``[members, rows, d_local]`` bool: which inputs of x each member keeps (as in :func:`sparse_gemv_cpu`), for the
    masked dense matmul of prompts and large batches: on CPU one compiled call for every member instead of a TopK per
    member in torch ops (``topk.topk_mask``: 60-70 us a member for one SmolLM2 row); on other devices torch ops."""
    ranked = x if x_full is None else x_full
    if not plan.compiled or not x.is_cpu or _torch_only(x):
        return torch.stack([_kept_mask_torch(plan, ranked, m, offset, x.shape[1]) for m in range(len(plan.widths))])
    masks = torch.empty(len(plan.widths), *x.shape, dtype=torch.bool)
    _fill_masks(_np(ranked.contiguous()).view(plan.bits), plan.members, offset, masks.numpy())
    return masks


def gemv_bags(plan: GemvPlan, x: torch.Tensor, x_full: torch.Tensor | None = None, offset: int = 0):
    """The bags of one step (see :func:`sparse_gemv_cpu`): ``(idx, values, offsets)`` for ``embedding_bag``, bag
    ``row * plan.chunks + c`` holding the table rows ``i * plan.chunks + c`` of the inputs i that column block c's
    member keeps in that row, ascending, with their values. Views of the plan's buffers: valid until its next call."""
    rows, d_local = x.shape
    if not plan.compiled:
        return _bags_torch(plan, x, x if x_full is None else x_full, offset)
    whole = plan.ks is not None and x_full is None  # every row keeps exactly its counts
    (idx, values, offsets), arrays = plan.bags(rows, plan.entries if whole else plan.chunks * d_local)
    x_np = _np(x)
    n = _fill_bags(x_np.view(plan.bits) if x_full is None else _np(x_full).view(plan.bits), x_np, plan.members,
                   offset, *arrays)
    return idx[:n], values[:n], offsets
