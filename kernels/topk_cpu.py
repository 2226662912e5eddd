"""CPU decode path for TopK activation sparsity: a GEMV that reads only the kept rows of the input-major weight, in place.

``y = sum_i x[i] * weight_t[i]`` over the kept indices i is exactly what ``F.embedding_bag(mode="sum",
per_sample_weights=...)`` computes, with ``weight_t`` (``[d_in, d_out]``) as the table: an optimised CPU kernel that reads the
table rows where they are, with no per-call sparse-tensor construction (``index_select`` + matmul copies the rows and is
slower than dense; ``torch.sparse.mm`` pays for building a COO tensor on every call). embedding_bag runs one bag per thread,
so each row's kept indices are cut into a few bags and their sums added.

Shipped flat inside every exported checkpoint; imports nothing but torch.
"""

import functools

import torch
import torch.nn.functional as F

__all__ = ["sparse_linear_cpu"]

MIN_BAG = 64  # kept rows per bag: fewer and the per-bag overhead outweighs the parallelism


@functools.lru_cache(maxsize=256)
def _bag_offsets(rows: int, k: int, bags: int) -> torch.Tensor:
    """Start of each bag in the flattened ``[rows, k]`` index list: ``bags`` bags per row, never crossing rows."""
    starts = torch.arange(bags) * k // bags
    return (torch.arange(rows)[:, None] * k + starts[None, :]).flatten()


def sparse_linear_cpu(x: torch.Tensor, idx: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y[b] = sum_i x[b, idx[b, i]] * weight_t[idx[b, i]] + bias``, reading only the kept rows of ``weight_t``.

    :param x: ``[B, d_in]`` activations
    :param idx: ``[B, k]`` int64 kept indices per row (e.g. the first k of ``topk.topk_order``)
    :param weight_t: ``[d_in, d_out]`` input-major weight (``linear.weight.t()`` stored contiguous)
    :param bias: ``[d_out]`` or None
    :returns: ``[B, d_out]`` in x's dtype
    """
    rows, k = idx.shape
    bags = max(1, min(2 * torch.get_num_threads(), k // MIN_BAG))
    values = x.gather(1, idx).to(weight_t.dtype)
    y = F.embedding_bag(idx.flatten(), weight_t, _bag_offsets(rows, k, bags), mode="sum", per_sample_weights=values.flatten())
    y = y.view(rows, bags, -1).sum(1) if bags > 1 else y
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
