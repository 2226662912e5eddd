"""TopK activation sparsity, torch reference op: the semantics every faster path must match. Also the threshold op of
the "threshold" runtime mode (TEAL), which zeroes by a fixed magnitude instead of a fixed count.

The rank of an entry is its magnitude, compared as the bit pattern of |x| (sign bit cleared): for IEEE floats that order is
the order of the magnitudes, and it puts NaN above infinity, so a NaN input is always among the kept entries (NaN in gives
NaN out, never a silently dropped NaN). Equal magnitudes rank by index, lower first. Every row keeps exactly k entries.

Shipped flat inside every exported checkpoint; imports nothing but torch.
"""

import torch

__all__ = ["KEY_TYPES", "magnitude_keys", "topk_order", "topk_mask", "topk_sparsify", "threshold_sparsify"]

KEY_TYPES = {  # float dtype -> (integer dtype of its bits, mask clearing the sign bit)
    torch.float16: (torch.int16, 0x7FFF),
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like |x| (NaN above inf): the bits of x with the sign bit cleared."""
    int_type, magnitude_bits = KEY_TYPES[x.dtype]
    return x.view(int_type) & magnitude_bits


def topk_order(x: torch.Tensor) -> torch.Tensor:
    """Indices of each row from largest to smallest magnitude, equal magnitudes lowest index first.

    The first k of them are the row's TopK for every k, so projections that read the same input (q/k/v, gate/up) share one.

    :param x: activations, ``[..., d]``
    """
    return torch.sort(magnitude_keys(x), dim=-1, descending=True, stable=True).indices


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries of largest |x| along the last dim: exactly k per row, ranked as in :func:`topk_order`.

    Faster than sorting: the k-th largest key is found with ``kthvalue``, then ties at it go to the lowest indices.
    No host synchronisation, so CUDA graphs can capture it.

    :param x: activations, ``[..., d]``
    :param k: entries to keep per row, 1 <= k <= d
    """
    d = x.shape[-1]
    assert 1 <= k <= d, f"k={k} outside [1, {d}]"
    keys = magnitude_keys(x)
    kth = torch.kthvalue(keys, d - k + 1, dim=-1, keepdim=True).values
    above = keys > kth
    tied = keys == kth
    room = k - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k entries of largest |x| per row (see :func:`topk_mask`); ``k >= d`` returns ``x`` itself."""
    if k >= x.shape[-1]:
        return x
    return torch.where(topk_mask(x, k), x, torch.zeros((), dtype=x.dtype, device=x.device))


def threshold_sparsify(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x * (|x| > t): zero the entries with |x| <= ``threshold``. NaN is kept (NaN in gives NaN out, as in TopK).

    ``threshold == 0`` returns ``x`` itself: zeroing the exact zeros would change no product.
    """
    if threshold == 0:
        return x
    return torch.where(x.abs() <= threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)
