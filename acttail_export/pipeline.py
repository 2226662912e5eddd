"""The export pipeline, the one path every ActTail checkpoint is written by: checks -> input -> alphas -> block -> folder.

    from acttail_export import ExportOptions, export
    result = export("./my-llama", "out/my-llama-50", ExportOptions(sparsity=0.5))

``acttail-export export`` parses its options into :class:`ExportOptions` and calls :func:`export`; ``--eval`` is
:func:`add_perplexity` on the result, ``--push-to-hub`` is :func:`acttail_export.hub.push_checkpoint` after it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocation import (DEFAULT_EPSILON, DEFAULT_SPARSER, DIRECTIONS, ModuleSparsity, check_bounds, keep_range,
                         site_projections, site_target)
from .calibration import DEFAULT_GREEDY_WINDOWS, DEFAULT_SEQLEN, DEFAULT_WINDOWS, Calibration, calibration_ids
from .card import CardFacts, card_files, inherited_license
from .checkpoint import check_out, replace_card, restore_interrupted_swap, write_checkpoint
from .errors import BadOption, ExportError
from .evaluate import (check_disjoint, check_seqlen, dense_block, load_in_process, load_model, load_tokenizer,
                       perplexity, tokenize_windows)
from .greedy import DEFAULT_STEP
from .hub import check_push_target
from .methods import Method, build_block
from .spectra import DEFAULT_ESTIMATOR, ESTIMATORS, estimator_alphas
from .text import read_text
from .trust import check_input_code
from .tuning import tune_block
from .weights import SourceModel, check_complete, resolve_model

__all__ = ["DTYPES", "DEFAULT_ALLOCATION", "DEFAULT_MODEL_ID", "EVAL_WINDOWS", "EVAL_SEQLEN", "ExportOptions",
           "ExportResult", "check_device", "export", "add_perplexity"]

DTYPES = ("float32", "float16", "bfloat16")
# export's allocation when none is named (the CLI's default too): per-projection loss-gradient curves on calibration text,
# guided by alpha; "acttail" is the calibration-free choice (docs/RESULTS.md, "The `calibrated` allocation")
DEFAULT_ALLOCATION = "calibrated"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_LICENSE = "apache-2.0"
# add_perplexity: the eval command's default windows, so the card's number is the one `acttail-export eval` reproduces
EVAL_WINDOWS, EVAL_SEQLEN = 8, 512


@dataclass(frozen=True)
class ExportOptions:
    """Every option of an export, named and defaulted as ``acttail-export export`` names them.

    :param sparsity: target S, the parameter-weighted mean sparsity of all projections, in [0, 1)
    :param allocation: see allocation.ALLOCATIONS; the default, ``calibrated``, runs the model on calibration text,
        ``acttail`` needs the weights only
    :param estimator: xmin rule of the Hill alpha; None: not named, i.e. ``mid``, or every estimator for ``auto``
    :param epsilon: spread in [0, 1], or ``"auto"`` to choose estimator, sparser and epsilon by calibration perplexity
    :param sparser: ``heavy-tail`` or ``light-tail``; None: not named, i.e. ``heavy-tail``, or both for ``auto``
    :param calibration_text: path of a UTF-8 text for calibrated, teal-greedy, threshold mode and ``auto``; None: the
        bundled text
    :param dtype: ``float32``, ``float16`` or ``bfloat16`` to convert the weights; None keeps the files byte-identical
    :param device: where the spectra and the ``auto`` trials run
    :param spectra_dtype: ``auto`` (float64 for ``peak``, else float32), ``float32`` or ``float64``
    :param spectra_cache: reuse (or store) the spectra in the cache folder
    :param link_weights: hard-link the weight files instead of copying them
    :param base_model: Hub id of the input for the card's metadata (default: the input if it is a Hub id)
    :param overwrite: replace ``out`` if it is a previous export (nothing else is ever replaced)
    :param push_to_hub: the Hub repo the checkpoint is meant for: checked (id, endpoint, token) before any work and named
        in the card; :func:`export` does not push (see :func:`acttail_export.hub.push_checkpoint`)
    :param endpoint: the Hub URL of ``push_to_hub``
    """

    sparsity: float
    allocation: str = DEFAULT_ALLOCATION
    mode: str = "topk"
    sites: str = "all"
    estimator: str | None = None
    epsilon: float | str = DEFAULT_EPSILON
    sparser: str | None = None
    min_sparsity: float = 0.0
    max_sparsity: float = 0.99
    prefill: str | float = "sparse"
    calibration_text: str | None = None
    calibration_windows: int = DEFAULT_WINDOWS
    calibration_seqlen: int = DEFAULT_SEQLEN
    greedy_step: float = DEFAULT_STEP
    greedy_windows: int = DEFAULT_GREEDY_WINDOWS
    dtype: str | None = None
    gguf_file: str | None = None
    device: str = "cpu"
    spectra_dtype: str = "auto"
    spectra_cache: bool = True
    link_weights: bool = False
    base_model: str | None = None
    overwrite: bool = False
    push_to_hub: str | None = None
    endpoint: str | None = None

    @property
    def auto(self) -> bool:
        return self.epsilon == "auto"

    @property
    def calibrates(self) -> bool:
        """Whether the export runs the model on calibration text (thresholds, a search, curves, or ``auto``)."""
        return self.method().needs_calibration or self.auto

    def method(self) -> Method:
        """The method these options name (for ``auto``: epsilon 0 until the search chooses)."""
        return Method(self.allocation, self.mode, self.sites, self.estimator or DEFAULT_ESTIMATOR,
                      0.0 if self.auto else self.epsilon, self.sparser or DEFAULT_SPARSER, self.min_sparsity,
                      self.max_sparsity, self.prefill, self.greedy_step)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: the checkpoint folder, its block, the allocation behind it, and the card's facts."""

    out: Path
    source: SourceModel
    block: dict
    modules: dict[str, ModuleSparsity]
    facts: CardFacts


def check_device(device: str) -> None:
    """``cuda`` only where torch sees a CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda asked for, but torch sees no CUDA device")


def _check(model: str | None, out: Path, options: ExportOptions) -> None:
    """Everything that can be checked before the input is read: bad options fail at once."""
    check_out(out, options.overwrite, [Path(model)] if model and Path(model).exists() else [])
    if options.link_weights and options.dtype and not _is_gguf(model, options):
        raise BadOption("--link-weights cannot link weights that --dtype converts; drop one of them")
    check_bounds(options.sparsity, options.min_sparsity, options.max_sparsity)
    check_device(options.device)
    if options.push_to_hub:
        check_push_target(options.push_to_hub, options.endpoint)
    for name, value, allowed in (("estimator", options.estimator, ESTIMATORS), ("sparser", options.sparser, DIRECTIONS),
                                 ("dtype", options.dtype, DTYPES)):
        if value is not None and value not in allowed:
            raise BadOption(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
    if options.auto and (options.allocation, options.mode) != ("acttail", "topk"):
        raise BadOption(f"--epsilon auto needs --allocation acttail --mode topk, got {_named(options.allocation)} / "
                        f"{options.mode}")


def _is_gguf(model: str | None, options: ExportOptions) -> bool:
    """Whether the input is a GGUF file (the embedded model is one): converted to safetensors, in ``dtype`` if named."""
    return model is None or options.gguf_file is not None or model.endswith(".gguf")


def _named(allocation: str) -> str:
    """An allocation's name for an error line, saying when it is the default (so one not asked for is explained)."""
    return f"{allocation} (the default)" if allocation == DEFAULT_ALLOCATION else allocation


def _calibration_ids(source: SourceModel, text: str, options: ExportOptions) -> torch.Tensor:
    """The calibration windows' token ids; where a model cannot give them (too few positions, no tokenizer) and the
    allocation is what calibrates, the error names the calibration-free choice."""
    try:
        check_seqlen(source.folder, options.calibration_seqlen, "--calibration-seqlen")
        return calibration_ids(source, text, options.calibration_windows, options.calibration_seqlen)
    except ExportError as e:
        if options.mode != "topk" or options.allocation not in ("calibrated", "teal-greedy"):
            raise  # thresholds and --epsilon auto calibrate whatever the allocation
        raise type(e)(f"{str(e).rstrip('.')}; --allocation {_named(options.allocation)} runs the model on "
                      "calibration text, --allocation acttail needs none") from e


def _tune(source: SourceModel, alphas: dict[str, dict[str, float]], windows: torch.Tensor, options: ExportOptions,
          log: Callable[[str], None]) -> tuple[Method, dict]:
    """``auto``: the method with the estimator, sparser and epsilon of the lowest calibration perplexity, and the record."""
    model = load_in_process(source).to(options.device)
    block = tune_block(model, source.projections, alphas, options.sparsity, windows,
                       sparsers=(options.sparser,) if options.sparser else DIRECTIONS,
                       s_min=options.min_sparsity, s_max=options.max_sparsity, sites=options.sites,
                       text=options.calibration_text or "the bundled Wikipedia text", log=log)
    method = dataclasses.replace(options.method(), estimator=block["estimator"], epsilon=block["epsilon"],
                                 sparser=block["sparser"])
    return method, block["tuning"]


def export(model: str | None, out: str | Path, options: ExportOptions, *, command: str | None = None,
           log: Callable[[str], None] = print, evaluation: tuple[int, int] | None = None) -> ExportResult:
    """Export ``model`` to the ActTail checkpoint folder ``out`` (written atomically) and return what was written.

    :param model: a model folder, Hub id or ``.gguf`` file; None: the embedded SmolLM2-135M-Instruct
    :param command: how the export was asked for, quoted in the model card (default: this call)
    :param log: called with each line worth telling the user (the input, the spectra, the ``auto`` trials)
    :param evaluation: (windows, seqlen) that :func:`add_perplexity` is to measure afterwards (``--eval``): when the
        export calibrates on the bundled text too, windows that would overlap are refused before any work
    """
    out = Path(out)
    for line in restore_interrupted_swap(out):  # first: an OUT put back counts as existing in the checks
        log(line)
    _check(model, out, options)
    method = options.method()
    calibrates = options.calibrates
    text = read_text(options.calibration_text) if calibrates else None
    is_gguf = _is_gguf(model, options)
    dtype = getattr(torch, options.dtype) if options.dtype else None
    source = resolve_model(model, options.gguf_file, dtype if is_gguf else None)
    log(f"model: {source.origin}" + (" (no MODEL given: the default)" if model is None else ""))
    check_input_code(source.folder)
    check_complete(source)
    site_target(source.projections, options.sparsity, options.sites, options.max_sparsity)
    for width in {p.in_features for p in site_projections(source.projections, options.sites)}:
        keep_range(width, options.min_sparsity, options.max_sparsity)  # bounds no count fits: refused before any work
    ids = _calibration_ids(source, text, options) if calibrates else None  # before the spectra: fail at once
    if evaluation and calibrates and (options.calibration_text is None or text == read_text(None)):
        check_disjoint(load_tokenizer(source.folder), text, evaluation,
                       (options.calibration_windows, options.calibration_seqlen), "the bundled Wikipedia text")
    calibration = None
    if method.needs_calibration:
        calibration = Calibration(source, ids, options.calibration_text or "bundled Wikipedia text",
                                  options.greedy_windows)
    estimators = (method.estimator,) if not options.auto or options.estimator else ESTIMATORS
    alphas = estimator_alphas(source, estimators, options.spectra_dtype, options.device, options.spectra_cache, log)
    tuning = None
    if options.auto:
        method, tuning = _tune(source, alphas, ids, options, log)
    block, modules = build_block(source, options.sparsity, method, alphas[method.estimator], calibration)
    if tuning is not None:
        block["tuning"] = tuning
    facts = CardFacts(
        origin=source.origin,
        command=command or f"acttail_export.export({model!r}, {str(out)!r}, {options!r})",
        base_model=options.base_model or (DEFAULT_MODEL_ID if model is None else source.hub_id),
        license=DEFAULT_MODEL_LICENSE if model is None else inherited_license(source.folder),
        repo_id=options.push_to_hub,
    )
    write_checkpoint(source, out, block, card_files(facts, block, modules), options.overwrite,
                     None if is_gguf else dtype, options.link_weights, log=log)
    return ExportResult(out, source, block, modules, facts)


def add_perplexity(result: ExportResult, windows: int = EVAL_WINDOWS, seqlen: int = EVAL_SEQLEN) -> dict:
    """Measure the written checkpoint's sparse and dense token perplexity on the bundled text (what ``acttail-export eval``
    reports for these windows) and put both into its model card; return them."""
    loaded, tokenizer = load_model(str(result.out))
    ids = tokenize_windows(tokenizer, read_text(None), seqlen, windows)
    sparse = perplexity(loaded, ids, desc="eval sparse")
    loaded.set_activation_sparsity(dense_block(loaded.config.activation_sparsity))
    dense = perplexity(loaded, ids, desc="eval dense")
    measured = {"dense": dense, "sparse": sparse, "windows": windows, "seqlen": seqlen,
                "text": "the bundled English Wikipedia articles (gensim test data)"}
    facts = dataclasses.replace(result.facts, perplexity=measured)
    replace_card(result.out, card_files(facts, result.block, result.modules))
    return measured
