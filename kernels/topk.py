"""TopK activation sparsity, torch reference op: the semantics every faster path must match.

Shipped flat inside every exported checkpoint; imports nothing but torch.
"""

import torch

__all__ = ["topk_mask", "topk_sparsify"]


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k entries of largest |x| along the last dim; ties at the k-th magnitude go to the lower index.

    The count is exact: every row keeps k entries, except that NaN entries are always kept (a NaN input gives a NaN
    output instead of being silently dropped), so a row with NaNs may keep more.

    :param x: activations, ``[..., d]``
    :param k: entries to keep per row, 1 <= k <= d
    """
    d = x.shape[-1]
    assert 1 <= k <= d, f"k={k} outside [1, {d}]"
    magnitude = x.abs()
    # The k-th largest magnitude is the (d - k + 1)-th smallest (kthvalue has no half-precision CPU kernel: upcast those,
    # exactly; float32 and float64 stay as they are so the threshold is one of the row's own values).
    exact = magnitude if magnitude.dtype in (torch.float32, torch.float64) else magnitude.float()
    kth = torch.kthvalue(exact, d - k + 1, dim=-1, keepdim=True).values.to(magnitude.dtype)
    mask = magnitude >= kth
    if bool((mask.sum(-1) > k).any()):
        # Ties at the threshold: keep every strictly larger entry, then the lowest-index equal ones up to k.
        above = magnitude > kth
        tied = magnitude == kth
        room = k - above.sum(-1, keepdim=True)
        mask = above | (tied & (tied.cumsum(-1) <= room))
    return mask | torch.isnan(x)


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k entries of largest |x| per row (see :func:`topk_mask`); ``k >= d`` returns ``x`` itself."""
    if k >= x.shape[-1]:
        return x
    return torch.where(topk_mask(x, k), x, torch.zeros((), dtype=x.dtype, device=x.device))
