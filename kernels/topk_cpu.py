"""CPU decode path for TopK activation sparsity: select each row's kept inputs, then a GEMV over only those rows of the
input-major weight ``weight_t`` (``[d_in, d_out]``), read in place.

With numba, each step is one compiled call (one selection serves a group: q/k/v, gate/up). A decode step is ~200
projections of well under a millisecond, where the few microseconds of every torch op add up. float32 / float64 GEMVs
accumulate in their own dtype; bfloat16 / float16 ones read the weights as 16-bit patterns, widen them in registers and
accumulate in float32 (output rounded once to the input dtype). The kernels are single-threaded: numba's thread pool is
a second OpenMP runtime beside torch's, and the two pools' spinning workers fight for the cores (a SmolLM2 GEMV split
over two numba threads took 2-10x as long as on one, 2026-12-02); float32 layers above ``NUMBA_MAX_BYTES`` of kept
weights (7B-sized) go to embedding_bag, whose bags run in torch's own pool. Without numba (or with ``ACTTAIL_NUMBA=0``) the
torch ops run. Shipped flat inside every exported checkpoint; needs only torch (numba, numpy and llvmlite are optional).
"""

import functools
import os

import torch
import torch.nn.functional as F

from .topk import magnitude_keys, threshold_sparsify, topk_order

try:  # optional fast path; the try block also keeps transformers' remote-code import check from requiring numba
    import numba
    import numpy as np
    from llvmlite import ir
    from numba.extending import intrinsic, overload
except ImportError:
    numba = None

__all__ = ["select_cpu", "sparse_linear_cpu", "threshold_linear_cpu", "numba_dtypes"]

USE_NUMBA = numba is not None and os.environ.get("ACTTAIL_NUMBA", "1") != "0"  # tests flip it to run the torch path

# Kept weight bytes up to which the single-threaded numba GEMV wins; above it (7B-sized layers) embedding_bag's bags on
# every thread stream more bandwidth than one core (4096x4096 fp32 at 50%: 1.73x dense with 4 bags, 1.1x with one).
NUMBA_MAX_BYTES = 8 * 2**20
MIN_BAG = 64  # torch path: kept rows per embedding_bag bag; fewer and the per-bag overhead outweighs the parallelism
HALF = (torch.bfloat16, torch.float16)
_FLOATS = (torch.float32, torch.float64)  # summed in their own dtype
_BITS = {}  # dtype -> (key bits, magnitude mask as in topk.magnitude_keys, shift leaving a key's top 11 bits)
_HALF_BITS = {}  # half dtype -> numpy type of its bit pattern: uint16 marks bfloat16, int16 float16 (see _widen)

if numba is not None:
    _BITS.update({torch.float32: (np.int32, 0x7FFFFFFF, 20), torch.float64: (np.int64, 0x7FFFFFFFFFFFFFFF, 52),
                  torch.bfloat16: (np.int16, 0x7FFF, 4), torch.float16: (np.int16, 0x7FFF, 4)})
    _HALF_BITS.update({torch.bfloat16: np.uint16, torch.float16: np.int16})
    _NO_BIAS = {dtype: np.zeros(0, bits) for dtype, bits in
                {torch.float32: np.float32, torch.float64: np.float64, **_HALF_BITS}.items()}

    def _jit(function):
        try:  # compiled once, then loaded from numba's on-disk cache
            return numba.njit(cache=True, nogil=True)(function)
        except RuntimeError:  # no writable cache directory: compile in every process
            return numba.njit(nogil=True)(function)

    @intrinsic
    def _widen_half(typingctx, bits):
        """float32 from a half's bit pattern, typed by its integer type: uint16 is bfloat16 (the top half of a float32:
        a shift), int16 is float16 (LLVM's fpext). Plain LLVM casts, so the GEMV loop vectorises around them."""
        def codegen(context, builder, signature, args):
            if signature.args[0] == numba.types.uint16:
                wide = builder.zext(args[0], ir.IntType(32))
                return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        if bits in (numba.types.uint16, numba.types.int16):
            return numba.types.float32(bits), codegen

    @intrinsic
    def _float_bits(typingctx, value):
        """The bit pattern of a float32, as uint32."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        if value == numba.types.float32:
            return numba.types.uint32(value), codegen

    @intrinsic
    def _half_bits(typingctx, value):
        """The bit pattern of float32 ``value`` rounded to float16 (LLVM's fptrunc: to nearest even)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        if value == numba.types.float32:
            return numba.types.int16(value), codegen

    def _widen(value):
        """``value`` as the accumulator's float: float32 / float64 as they are, a half's bits through _widen_half."""

    @overload(_widen, jit_options={"cache": True})
    def _widen_impl(value):
        if value in (numba.types.uint16, numba.types.int16):
            return lambda value: _widen_half(value)
        return lambda value: value

    def _narrow(out, j, value):
        """Store the accumulated ``value`` into ``out`` at j: as it is for float32 / float64 outputs, rounded to nearest
        even into the bits of a half output (numba only)."""

    @overload(_narrow, jit_options={"cache": True})
    def _narrow_impl(out, j, value):
        if isinstance(out.dtype, numba.types.Float):
            def store(out, j, value):
                out[j] = value
            return store
        if out.dtype == numba.types.int16:
            def store_float16(out, j, value):
                out[j] = _half_bits(value)
            return store_float16

        def store_bfloat16(out, j, value):  # as torch rounds: to nearest even on the dropped 16 bits; NaN stays NaN
            if value != value:
                out[j] = 0x7FC0
            else:
                u = np.uint64(_float_bits(value))
                out[j] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return store_bfloat16

    @_jit
    def _select(bits, mask, shift, ks, starts, out):
        """Per row and k: the indices of the k largest keys ``bits & mask`` (ties to the lower index), ascending (the
        GEMV then reads weight rows front to back), into ``out[row, start:start + k]``. The k-th largest key comes from
        a histogram of the keys' top 11 bits (``key >> shift``), then ``np.partition`` among the few keys in its bin:
        about half the time of a quickselect over the row, whose comparisons are coin flips to the branch predictor."""
        d = bits.shape[1]
        keys = np.empty(d, np.int64)
        bin_keys = np.empty(d, np.int64)
        hist = np.zeros((mask >> shift) + 1, np.int32)
        for b in range(bits.shape[0]):
            hist[:] = 0
            top = 0
            for i in range(d):
                keys[i] = bits[b, i] & mask
                hist[keys[i] >> shift] += 1
                top = max(top, keys[i])
            for m in range(ks.shape[0]):
                k, n = ks[m], starts[m]
                if k >= d:
                    out[b, n:n + d] = np.arange(d)
                    continue
                above, t = 0, top >> shift  # bins above t hold ``above`` keys, fewer than k; bin t completes k
                while above + hist[t] < k:
                    above += hist[t]
                    t -= 1
                c = 0
                for i in range(d):
                    if keys[i] >> shift == t:
                        bin_keys[c] = keys[i]
                        c += 1
                p = c - (k - above)  # the k-th largest key overall is the (k - above)-th largest in bin t
                in_bin = np.partition(bin_keys[:c], p)
                threshold = in_bin[p]
                ties = k - above  # keys equal to the threshold that are kept: k minus those above it
                for i in range(p + 1, c):
                    ties -= in_bin[i] > threshold
                for i in range(d):
                    if keys[i] > threshold or (keys[i] == threshold and ties > 0):
                        ties -= keys[i] == threshold
                        out[b, n] = i
                        n += 1

    @_jit
    def _gemv_columns(x, idx, w, bias, acc, out, b, j0, j1):
        """Columns ``j0:j1`` of row b: ``out[b] = sum_t x[b, idx[b, t]] * w[idx[b, t]] (+ bias)``, summed in ``acc``
        (float32, or float64 for float64 inputs) and stored once into out's dtype (see _widen, _narrow).

        Eight kept rows per pass over the output: eight concurrent streams from memory (one stream per row leaves the
        core waiting on memory) and an eighth of the accumulator traffic: 1.3-1.6x the bandwidth of a row at a time."""
        a = acc[b, j0:j1]
        a[:] = 0
        k = idx.shape[1]
        for t in range(0, k - k % 8, 8):
            i0, i1, i2, i3, i4, i5, i6, i7 = idx[b, t:t + 8]
            v0, v1, v2, v3 = _widen(x[b, i0]), _widen(x[b, i1]), _widen(x[b, i2]), _widen(x[b, i3])
            v4, v5, v6, v7 = _widen(x[b, i4]), _widen(x[b, i5]), _widen(x[b, i6]), _widen(x[b, i7])
            r0, r1, r2, r3 = w[i0, j0:j1], w[i1, j0:j1], w[i2, j0:j1], w[i3, j0:j1]
            r4, r5, r6, r7 = w[i4, j0:j1], w[i5, j0:j1], w[i6, j0:j1], w[i7, j0:j1]
            for j in range(j1 - j0):
                a[j] += ((v0 * _widen(r0[j]) + v1 * _widen(r1[j])) + (v2 * _widen(r2[j]) + v3 * _widen(r3[j]))) + (
                    (v4 * _widen(r4[j]) + v5 * _widen(r5[j])) + (v6 * _widen(r6[j]) + v7 * _widen(r7[j])))
        for t in range(k - k % 8, k):
            v, r = _widen(x[b, idx[b, t]]), w[idx[b, t], j0:j1]
            for j in range(j1 - j0):
                a[j] += v * _widen(r[j])
        if bias.shape[0]:
            for j in range(j1 - j0):
                a[j] += _widen(bias[j0 + j])
        for j in range(j1 - j0):
            _narrow(out[b], j0 + j, a[j])

    @_jit
    def _check_indices(idx, d_in):
        for b in range(idx.shape[0]):
            for t in range(idx.shape[1]):
                if idx[b, t] < 0 or idx[b, t] >= d_in:
                    raise IndexError("kept index out of range")

    @_jit
    def _gemv(x, idx, w, bias, acc, out):
        """Every row, on the calling thread."""
        _check_indices(idx, w.shape[0])
        for b in range(idx.shape[0]):
            _gemv_columns(x, idx, w, bias, acc, out, b, 0, w.shape[1])


def _torch_only(*tensors: torch.Tensor | None) -> bool:
    """Whether this call must stay in torch ops: torch.compile is tracing it, or autograd must see it (no backward here)."""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _np(t: torch.Tensor):
    """A numpy view, no copy (a parameter requires grad even in no_grad); bfloat16 / float16 as their bit patterns."""
    t = t.detach() if t.requires_grad else t
    return t.view(torch.int16).numpy().view(_HALF_BITS[t.dtype]) if t.dtype in HALF else t.numpy()


def numba_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes whose decode steps run compiled here (none without numba or with ACTTAIL_NUMBA=0)."""
    return tuple(_BITS) if USE_NUMBA else ()


@functools.lru_cache(maxsize=256)
def _group(ks: tuple) -> tuple:
    starts = [sum(ks[:i]) for i in range(len(ks))]
    return np.array(ks, dtype=np.int64), np.array(starts, dtype=np.int64), starts, sum(ks)


def select_cpu(rows: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Kept input indices of each row for every k in ``ks`` (1 <= k), as ranked by ``topk.topk_order``.

    :param rows: ``[B, d]`` activations
    :returns: ``(selection, starts)``: member m keeps ``selection[:, starts[m]:starts[m] + ks[m]]``
    """
    if USE_NUMBA and rows.dtype in _BITS and rows.is_cpu and not _torch_only(rows):
        ks_np, starts_np, starts, total = _group(tuple(ks))
        out = torch.empty(rows.shape[0], total, dtype=torch.int64)
        bits, mask, shift = _BITS[rows.dtype]
        _select(_np(rows).view(bits), mask, shift, ks_np, starts_np, out.numpy())
        return out, starts
    return _ranking(rows, max(ks)), [0] * len(ks)  # the top max(ks) in rank order: every k is a prefix of it


@functools.lru_cache(maxsize=16)
def _reversed_index(d: int) -> torch.Tensor:
    return torch.arange(d - 1, -1, -1)


def _ranking(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The first k columns of ``topk_order(rows)``. For fp32 one ``topk`` over unique int64 keys (the magnitude bits
    above the reversed index, so equal magnitudes rank lower index first) does it: exact, and cheaper than a sort."""
    if rows.dtype != torch.float32 or not rows.is_cpu or torch.compiler.is_compiling():
        return topk_order(rows)
    keys = (magnitude_keys(rows).long() << 32) | _reversed_index(rows.shape[-1])
    return keys.topk(k, dim=-1).indices


@functools.lru_cache(maxsize=256)
def _bag_offsets(rows: int, k: int, bags: int) -> torch.Tensor:
    """Start of each bag in the flattened ``[rows, k]`` index list: ``bags`` bags per row, never crossing rows."""
    starts = torch.arange(bags) * k // bags
    return (torch.arange(rows)[:, None] * k + starts[None, :]).flatten()


def sparse_linear_cpu(x: torch.Tensor, idx: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[b] = sum_i x[b, idx[b, i]] * weight_t[idx[b, i]] + bias``, reading only the kept rows of ``weight_t``.

    :param x: ``[B, d_in]`` activations
    :param idx: ``[B, k]`` int64 kept indices per row (a member's columns of :func:`select_cpu`, or ``topk_order``'s first k)
    :param weight_t: ``[d_in, d_out]`` input-major weight (``linear.weight.t()`` stored contiguous)
    :param bias: ``[d_out]`` or None
    :returns: ``[B, d_out]`` in x's dtype
    """
    dtype = x.dtype
    half = dtype in HALF  # no torch op sums half-precision rows in float32 in place: numba at every size
    small = half or idx.numel() * weight_t.shape[1] * weight_t.element_size() <= NUMBA_MAX_BYTES
    if (USE_NUMBA and small and dtype in _BITS and x.is_cpu and weight_t.is_cpu and weight_t.dtype == dtype
            and (bias is None or bias.dtype == dtype) and not _torch_only(x, weight_t, bias)):
        out = torch.empty(idx.shape[0], weight_t.shape[1], dtype=dtype)
        acc = out if dtype in _FLOATS else torch.empty(out.shape, dtype=torch.float32)  # float32 sums for halves
        args = _np(x), _np(idx), _np(weight_t), _NO_BIAS[dtype] if bias is None else _np(bias), _np(acc), _np(out)
        _gemv(*args)
        return out
    if half:  # torch ops, float32 sums (embedding_bag would sum in half precision): copies the kept rows
        y = torch.bmm(x.gather(1, idx).float().unsqueeze(1), weight_t[idx].float()).squeeze(1)
        return (y if bias is None else y + bias.float()).to(dtype)
    # torch: embedding_bag with weight_t as the table sums the kept rows where they are. It runs one bag per thread, so
    # each row's kept indices are cut into a few bags and their sums added (one bag per row when torch.compile traces)
    rows, k = idx.shape
    bags = 1 if torch.compiler.is_compiling() else max(1, min(2 * torch.get_num_threads(), k // MIN_BAG))
    values = x.gather(1, idx).to(weight_t.dtype)
    if bags == 1:
        y = F.embedding_bag(idx, weight_t, mode="sum", per_sample_weights=values)
    else:
        y = F.embedding_bag(idx.flatten(), weight_t, _bag_offsets(rows, k, bags), mode="sum",
                            per_sample_weights=values.flatten()).view(rows, bags, -1).sum(1)
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def threshold_linear_cpu(x: torch.Tensor, threshold: float, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[b] = sum_{i: |x[b, i]| > t} x[b, i] * weight_t[i] + bias`` (NaN kept, as ``topk.threshold_sparsify`` keeps it),
    reading only the kept rows of ``weight_t``. Each row has its own count, so rows go one at a time.

    :param x: ``[B, d_in]`` activations
    :param weight_t: ``[d_in, d_out]`` input-major weight
    :returns: ``[B, d_out]`` in x's dtype
    """
    if torch.compiler.is_compiling():  # the kept count is data: a traced graph takes the mask + dense matmul
        return F.linear(threshold_sparsify(x, threshold), weight_t.t(), bias)
    kept = ~(x.abs() <= threshold)
    return torch.cat([sparse_linear_cpu(x[b:b + 1], kept[b].nonzero().view(1, -1), weight_t, bias)
                      for b in range(x.shape[0])])
