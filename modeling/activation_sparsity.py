"""The ``activation_sparsity`` block of an ActTail config.json: a strict dataclass and its checks.

Shipped flat inside every exported checkpoint, and used by the exporter to build the block it writes. Pure Python.
:meth:`ActivationSparsity.from_dict` refuses unknown keys and checks every field; :meth:`ActivationSparsity.check_model`
then checks the block against the model it is applied to. Every refusal is one ValueError line naming the field.
"""

import math
import os
from dataclasses import dataclass, fields, replace
from fractions import Fraction

from .projections import SITES, parse_projection

__all__ = [
    "FORMAT_VERSION",
    "MODES",
    "PREFILL_MODES",
    "SPARSE_BACKENDS",
    "ModuleSpec",
    "ActivationSparsity",
    "validate_prefill",
    "validate_sparse_backend",
    "environment_backend",
    "sparse_prompt_tokens",
    "validate_activation_sparsity",
]

FORMAT_VERSION = 1
# How an input is sparsified: "topk" keeps exactly ``keep`` entries per token; "threshold" zeroes the entries with
# |x| <= the module's calibrated ``threshold`` (TEAL), so the kept count varies per token and ``keep`` is its expected value.
# Optional block field (default "topk"); "threshold" adds a "threshold" to every module spec. Both are format version 1.
MODES = ("topk", "threshold")
PREFILL_MODES = ("sparse", "dense")
# How a decode step runs: "auto" picks Triton kernels on CUDA, the gather path on CPU (fp32/fp64), else "reference" (the
# TopK mask + dense matmul, the semantics the others match; force it to debug). Config ``sparse_backend``; where that is
# "auto", the environment variable ACTTAIL_SPARSE_BACKEND.
SPARSE_BACKENDS = ("auto", "triton", "cpu", "reference")
# effective_sparsity is written rounded to 6 decimals, a module's sparsity to 4
_EFFECTIVE_TOLERANCE = 1e-6
_SPARSITY_TOLERANCE = 5e-5 + 1e-9


def validate_prefill(prefill) -> None:
    """``prefill`` is "sparse" (every token), "dense" (decode steps only) or a fraction f in (0, 1]: the last f of a prompt."""
    if prefill in PREFILL_MODES:
        return
    if isinstance(prefill, bool) or not isinstance(prefill, (int, float)) or not 0 < prefill <= 1:
        raise ValueError(f"activation_sparsity.prefill must be one of {PREFILL_MODES} or a fraction in (0, 1], got {prefill!r}")


def validate_sparse_backend(backend) -> None:
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"sparse_backend must be one of {SPARSE_BACKENDS}, got {backend!r}")


def environment_backend() -> str:
    """The environment variable ACTTAIL_SPARSE_BACKEND, which a ``sparse_backend`` of "auto" reads ("auto" if unset)."""
    backend = os.environ.get("ACTTAIL_SPARSE_BACKEND", "auto")
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"the environment variable ACTTAIL_SPARSE_BACKEND must be one of {SPARSE_BACKENDS}, "
                         f"got {backend!r}")
    return backend


def sparse_prompt_tokens(prefill: float, tokens: int) -> int:
    """How many of a prompt's last tokens a fraction ``prefill`` sparsifies: ceil(f * S) of f as written (f = 0.07,
    S = 100: 7, where float arithmetic gives 7.000000000000001 and ceil 8)."""
    return math.ceil(Fraction(str(prefill)) * tokens)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # bool is an int subclass, never a number here


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_version(version) -> None:
    if not _is_int(version) or version != FORMAT_VERSION:
        raise ValueError(f"activation_sparsity.format_version is {version!r}; this code reads version {FORMAT_VERSION}")


def _check_keys(data, cls, field: str) -> None:
    """``data`` is a dict whose keys are all fields of ``cls`` and include its required ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{field} must be a dict, got {type(data).__name__}")
    known = [f.name for f in fields(cls)]
    unknown = [key for key in data if key not in known]
    if unknown:
        raise ValueError(f"{field}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
    required = [name for name in cls._REQUIRED if name not in data]
    if required:
        raise ValueError(f"{field}: missing key {required[0]!r}")


@dataclass(frozen=True, kw_only=True)
class ModuleSpec:
    """One projection's entry in ``modules``: keep ``keep`` of its ``in_features`` inputs per token.

    :param alpha: the Hill alpha the allocation used (a record)
    :param sparsity: 1 - keep / in_features, rounded to 4 decimals (a record, checked against keep)
    :param threshold: mode "threshold": zero the inputs with |x| <= threshold (required there, ignored in mode "topk")
    """

    alpha: float | None = None
    sparsity: float | None = None
    keep: int
    in_features: int
    threshold: float | None = None

    _REQUIRED = ("keep", "in_features")

    @classmethod
    def from_dict(cls, data: dict, field: str) -> "ModuleSpec":
        _check_keys(data, cls, field)
        return cls(**data)

    def check(self, field: str) -> None:
        """Raise ValueError naming ``field`` (``activation_sparsity.modules[name]``) and the bad key."""
        if not _is_int(self.in_features) or self.in_features < 1:
            raise ValueError(f"{field}.in_features must be an int >= 1, got {self.in_features!r}")
        if not _is_int(self.keep) or not 1 <= self.keep <= self.in_features:
            raise ValueError(f"{field}.keep: keep={self.keep!r} must be an int in [1, in_features={self.in_features}]")
        if self.alpha is not None and not _is_number(self.alpha):
            raise ValueError(f"{field}.alpha must be a number, got {self.alpha!r}")
        sparsity = 1 - self.keep / self.in_features
        if self.sparsity is not None and not (_is_number(self.sparsity) and abs(self.sparsity - sparsity) <= _SPARSITY_TOLERANCE):
            raise ValueError(f"{field}.sparsity is {self.sparsity!r}, but keep {self.keep} of {self.in_features} inputs "
                             f"is {sparsity:.4f}")
        # math.isfinite rejects NaN and inf
        if self.threshold is not None and not (_is_number(self.threshold) and math.isfinite(self.threshold)
                                               and self.threshold >= 0):
            raise ValueError(f"{field}.threshold: needs a finite threshold >= 0, got {self.threshold!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, kw_only=True)
class ActivationSparsity:
    """The ``activation_sparsity`` block: which inputs each projection keeps, how, and how the allocation was made.

    ``modules`` and ``format_version`` are required; ``mode``, ``sites`` and ``prefill`` have defaults (blocks written
    before they existed); the allocation's record (``method`` ... ``sparser``, ``calibration``, ``tuning``) is optional
    and checked where given. Field order is the order the exporter writes.

    :param modules: projection module name -> :class:`ModuleSpec`; once applied to a model, every q/k/v/o/gate/up/down
        projection of every decoder layer must be listed (a dense one with keep = in_features)
    :param sites: which projection kinds the method sparsified (see projections.SITES); the others keep every input
    :param effective_sparsity: sum_p n_p (1 - keep_p / d_in_p) / sum_p n_p over the listed projections (n_p = d_out d_in)
    """

    format_version: int
    method: str | None = None
    mode: str = "topk"
    sites: str = "all"
    target_sparsity: float | None = None
    effective_sparsity: float | None = None
    estimator: str | None = None
    epsilon: float | None = None
    sparser: str | None = None
    prefill: str | float = "sparse"
    calibration: dict | None = None
    modules: dict[str, ModuleSpec]
    tuning: dict | None = None

    _REQUIRED = ("format_version", "modules")

    def __post_init__(self):
        self.check()

    @classmethod
    def from_dict(cls, block: dict) -> "ActivationSparsity":
        """Read and check a block as found in config.json (ValueError, one line, on anything else)."""
        if not isinstance(block, dict):
            raise ValueError(f"activation_sparsity must be a dict, got {type(block).__name__}")
        _check_version(block.get("format_version"))  # first: another version may have other keys
        _check_keys(block, cls, "activation_sparsity")
        modules = block["modules"]
        if not isinstance(modules, dict) or not modules:
            raise ValueError("activation_sparsity.modules must map projection names to {keep, in_features, ...}")
        specs = {name: ModuleSpec.from_dict(spec, f"activation_sparsity.modules[{name!r}]") for name, spec in modules.items()}
        return cls(**{**block, "modules": specs})

    def check(self) -> None:
        """The checks that need no model; :meth:`check_model` adds those against a model."""
        _check_version(self.format_version)
        validate_prefill(self.prefill)
        if self.mode not in MODES:
            raise ValueError(f"activation_sparsity.mode must be one of {MODES}, got {self.mode!r}")
        if self.sites not in tuple(SITES):
            raise ValueError(f"activation_sparsity.sites must be one of {tuple(SITES)}, got {self.sites!r}")
        # the allocation's record: optional, of the right type where given
        for name in ("method", "estimator", "sparser"):
            if (value := getattr(self, name)) is not None and not isinstance(value, str):
                raise ValueError(f"activation_sparsity.{name} must be a string, got {value!r}")
        for name in ("target_sparsity", "effective_sparsity", "epsilon"):
            if (value := getattr(self, name)) is not None and not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"activation_sparsity.{name} must be a number in [0, 1], got {value!r}")
        for name in ("calibration", "tuning"):
            if (value := getattr(self, name)) is not None and not isinstance(value, dict):
                raise ValueError(f"activation_sparsity.{name} must be a dict, got {value!r}")
        if not isinstance(self.modules, dict) or not self.modules:
            raise ValueError("activation_sparsity.modules must map projection names to {keep, in_features, ...}")
        for name, spec in self.modules.items():
            field = f"activation_sparsity.modules[{name!r}]"
            parsed = parse_projection(name)
            if parsed is None:
                raise ValueError(f"{field}: not a q/k/v/o/gate/up/down projection of a decoder layer "
                                 "(model.layers.<i>.self_attn.<q|k|v|o>_proj or model.layers.<i>.mlp.<gate|up|down>_proj)")
            if not isinstance(spec, ModuleSpec):
                raise ValueError(f"{field} must be a ModuleSpec, got {type(spec).__name__}")
            spec.check(field)
            if self.mode == "threshold" and spec.threshold is None:
                raise ValueError(f"{field}.threshold: mode 'threshold' needs a finite threshold >= 0, got None")
            if parsed[1] not in SITES[self.sites] and spec.keep != spec.in_features:
                raise ValueError(f"{field}.keep is {spec.keep}, but sites {self.sites!r} leaves {parsed[1]} dense "
                                 f"(keep = in_features = {spec.in_features})")

    def check_model(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Check the block against a model: ``shapes`` maps each of its projections' names to (out_features, in_features).

        Every listed module must be one of them with the same in_features; every one of them must be listed (a truncated
        block is refused); the recorded effective sparsity must be the one the keeps give.
        """
        for name, spec in self.modules.items():
            if name not in shapes:
                raise ValueError(f"activation_sparsity.modules[{name!r}]: this model has no such projection")
            if shapes[name][1] != spec.in_features:
                raise ValueError(f"activation_sparsity.modules[{name!r}].in_features is {spec.in_features}, but the "
                                 f"model's projection has {shapes[name][1]}")
        missing = [name for name in shapes if name not in self.modules]
        if missing:
            raise ValueError(f"activation_sparsity.modules lists {len(self.modules)} of the model's {len(shapes)} "
                             f"projections; missing {missing[0]!r} (list a dense one with keep = in_features)")
        if self.effective_sparsity is not None:
            params = sum(out * d_in for out, d_in in shapes.values())
            skipped = sum(shapes[name][0] * (spec.in_features - spec.keep) for name, spec in self.modules.items())
            if abs(skipped / params - self.effective_sparsity) > _EFFECTIVE_TOLERANCE:
                raise ValueError(f"activation_sparsity.effective_sparsity is {self.effective_sparsity!r}, but the keeps "
                                 f"give {skipped / params:.6f}")

    def dense(self) -> "ActivationSparsity":
        """The same block keeping every input: the model with its sparsity switched off (threshold 0 keeps every input)."""
        threshold = {"threshold": 0.0} if self.mode == "threshold" else {}
        modules = {name: replace(spec, keep=spec.in_features, sparsity=0.0, **threshold)
                   for name, spec in self.modules.items()}
        return replace(self, modules=modules, effective_sparsity=0.0)

    def to_dict(self) -> dict:
        """The block as config.json holds it (optional fields that are None are left out)."""
        block = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        block["modules"] = {name: spec.to_dict() for name, spec in self.modules.items()}
        return block


def validate_activation_sparsity(block: dict) -> None:
    """Check a block without a model (see :meth:`ActivationSparsity.from_dict`); ValueError naming the first bad field."""
    ActivationSparsity.from_dict(block)
