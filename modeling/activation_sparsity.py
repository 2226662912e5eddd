"""The ``activation_sparsity`` block of an ActTail config.json: its format and its checks.

Shipped flat inside every exported checkpoint, and used by the exporter to check a block before writing it. Pure Python.
"""

import math

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "PREFILL_MODES",
    "SPARSE_BACKENDS",
    "validate_prefill",
    "validate_sparse_backend",
    "validate_activation_sparsity",
]

FORMAT_VERSION = 1
# How an input is sparsified: "topk" keeps exactly ``keep`` entries per token; "threshold" zeroes the entries with
# |x| <= the module's calibrated ``threshold`` (TEAL), so the kept count varies per token and ``keep`` is its expected value.
# Optional block field (default "topk"); "threshold" adds a "threshold" to every module spec. Both are format version 1.
MODES = ("topk", "threshold")
PREFILL_MODES = ("sparse", "dense")
# How a decode step runs: "auto" picks Triton kernels on CUDA, the gather path on CPU (fp32/fp64), else "reference" (the
# TopK mask + dense matmul, the semantics the others match; force it to debug). Config ``sparse_backend`` or the environment
# variable ACTTAIL_SPARSE_BACKEND, which wins.
SPARSE_BACKENDS = ("auto", "triton", "cpu", "reference")


def validate_prefill(prefill) -> None:
    """``prefill`` is "sparse" (every token), "dense" (decode steps only) or a fraction f in (0, 1]: the last f of a prompt."""
    if prefill in PREFILL_MODES:
        return
    if isinstance(prefill, bool) or not isinstance(prefill, (int, float)) or not 0 < prefill <= 1:
        raise ValueError(f"activation_sparsity.prefill must be one of {PREFILL_MODES} or a fraction in (0, 1], got {prefill!r}")


def validate_sparse_backend(backend) -> None:
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse_backend must be one of {SPARSE_BACKENDS}, got {backend!r}")


def validate_activation_sparsity(block: dict) -> None:
    """Check an ``activation_sparsity`` block; raise ValueError naming the first bad field."""
    if block.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"activation_sparsity.format_version is {block.get('format_version')!r}; this code reads version {FORMAT_VERSION}"
        )
    validate_prefill(block.get("prefill", "sparse"))
    mode = block.get("mode", "topk")
    if mode not in MODES:
        raise ValueError(f"activation_sparsity.mode must be one of {MODES}, got {mode!r}")
    modules = block.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError("activation_sparsity.modules must map module names to {keep, in_features, ...}")
    for name, spec in modules.items():
        if not isinstance(spec, dict):
            raise ValueError(f"activation_sparsity.modules[{name!r}] must be a dict, got {spec!r}")
        keep, in_features = spec.get("keep"), spec.get("in_features")
        if not isinstance(in_features, int) or not isinstance(keep, int) or not 1 <= keep <= in_features:
            raise ValueError(f"activation_sparsity.modules[{name!r}]: keep={keep!r} must be an int in [1, in_features={in_features!r}]")
        if mode == "threshold":
            threshold = spec.get("threshold")
            # bool is an int subclass; a threshold of True is a bug, not 1.0. math.isfinite rejects NaN and inf.
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                    or threshold < 0:
                raise ValueError(f"activation_sparsity.modules[{name!r}]: mode 'threshold' needs a finite threshold >= 0, "
                                 f"got {threshold!r}")
