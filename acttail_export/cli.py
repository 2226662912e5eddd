"""acttail-export: export, analyze, evaluate and try ActTail checkpoints.

Examples::

    acttail-export export out/smollm2-acttail-50 --sparsity 0.5          # the embedded SmolLM2-135M-Instruct
    acttail-export export ./my-llama out/my-llama-70 --sparsity 0.7 --estimator peak
    acttail-export analyze ./my-llama
    acttail-export eval out/smollm2-acttail-50 --windows 8 --dense-baseline
    acttail-export generate out/smollm2-acttail-50 --prompt "The Eiffel tower is"
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import click
import torch

from .allocation import ALLOCATIONS, DEFAULT_EPSILON, DEFAULT_SPARSER, DIRECTIONS, allocate, check_bounds
from .card import model_card
from .checkpoint import check_out, sparsity_block, write_checkpoint
from .errors import ExportError
from .evaluate import calibration_windows, dense_block, load_model, perplexity, tokenize_windows
from .modeling.activation_sparsity import PREFILL_MODES, validate_prefill
from .spectra import DEFAULT_ESTIMATOR, ESTIMATORS, alphas_from_spectra, compute_spectra
from .text import read_text
from .tuning import load_for_tuning, tune_block
from .weights import resolve_model

DTYPES = ("float32", "float16", "bfloat16")


def _torch_dtype(name: str | None):
    return getattr(torch, name) if name else None


def _parse_prefill(value: str) -> str | float:
    try:
        prefill = value if value in PREFILL_MODES else float(value)
        validate_prefill(prefill)
    except ValueError:
        raise click.BadParameter(f"must be one of {', '.join(PREFILL_MODES)} or a fraction in (0, 1], got {value!r}") from None
    return prefill


def _parse_epsilon(value) -> float | str:
    """``auto`` or a spread in [0, 1]."""
    if value == "auto":
        return value
    try:
        epsilon = float(value)
    except ValueError:
        epsilon = float("nan")
    if not 0.0 <= epsilon <= 1.0:
        raise click.BadParameter(f"must be auto or a number in [0, 1], got {value!r}")
    return epsilon


def _split_model_out(paths: tuple[str, ...]) -> tuple[str | None, Path]:
    if len(paths) == 1:
        return None, Path(paths[0])
    if len(paths) == 2:
        return paths[0], Path(paths[1])
    raise click.UsageError(f"expected [MODEL] OUT, got {len(paths)} arguments")


@click.group(help=__doc__.split("\n\n")[0])
def cli() -> None:
    pass


@cli.command()
@click.argument("paths", nargs=-1, metavar="[MODEL] OUT")
@click.option("--sparsity", type=click.FloatRange(0, 1, max_open=True), required=True,
              help="Target sparsity S: mean over all projection parameters, in [0, 1).")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default="acttail", show_default=True,
              help="acttail: per-projection alpha; block: per-block mean alpha; uniform: S everywhere.")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default=DEFAULT_ESTIMATOR, show_default=True,
              help="xmin rule of the Hill alpha estimate.")
@click.option("--epsilon", default=str(DEFAULT_EPSILON), show_default=True, callback=lambda ctx, p, v: _parse_epsilon(v),
              help="Spread of the allocation: sparsities lie in eta * [1 - eps, 1 + eps] before clipping. auto: choose "
                   "estimator, sparser and epsilon by perplexity on calibration windows (an explicit --estimator or "
                   "--sparser restricts the search).")
@click.option("--sparser", type=click.Choice(DIRECTIONS), default=DEFAULT_SPARSER, show_default=True,
              help="Which projections get more sparsity: small alpha (heavy-tail) or large alpha (light-tail).")
@click.option("--min-sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--max-sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.99, show_default=True)
@click.option("--prefill", default="sparse", show_default=True, callback=lambda ctx, p, v: _parse_prefill(v),
              help="Which prompt tokens are sparse: sparse (all), dense (none), or a fraction f (the last f).")
@click.option("--calibration-text", type=click.Path(), default=None,
              help="UTF-8 text for --epsilon auto (default: the bundled English Wikipedia articles); its end is used.")
@click.option("--calibration-windows", type=click.IntRange(1), default=4, show_default=True,
              help="Calibration windows for --epsilon auto.")
@click.option("--calibration-seqlen", type=click.IntRange(2), default=512, show_default=True)
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Convert weights (default: keep files unchanged).")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or Hub repo).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for the spectra and the --epsilon auto trials.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--verbose", is_flag=True, help="Print one line per projection.")
@click.pass_context
def export(ctx, paths, sparsity, allocation, estimator, epsilon, sparser, min_sparsity, max_sparsity, prefill,
           calibration_text, calibration_windows, calibration_seqlen, dtype, gguf_file, device, overwrite, verbose) -> None:
    """Export MODEL (folder, Hub id or GGUF; default: SmolLM2-135M-Instruct) to the ActTail checkpoint folder OUT."""
    model, out = _split_model_out(paths)
    # Everything that can be checked before the spectra is checked here, so bad input fails at once.
    check_out(out, overwrite)
    check_bounds(sparsity, min_sparsity, max_sparsity)
    _check_device(device)
    if epsilon == "auto" and allocation != "acttail":
        raise click.BadParameter(f"auto needs --allocation acttail, got {allocation}", param_hint="'--epsilon'")
    text = read_text(calibration_text) if epsilon == "auto" else None
    start = time.perf_counter()
    is_gguf = model is None or gguf_file is not None or model.endswith(".gguf")
    source = resolve_model(model, gguf_file, _torch_dtype(dtype) if is_gguf else None)
    tuning = None
    if epsilon == "auto":
        spectra, tuned = _tune(ctx, source, text)
        estimator, epsilon, sparser, tuning = (tuned[key] for key in ("estimator", "epsilon", "sparser", "tuning"))
    else:
        spectra = compute_spectra(source, device)
    alphas = alphas_from_spectra(spectra, estimator)
    modules = allocate(source.projections, alphas, sparsity, allocation, epsilon, sparser, min_sparsity, max_sparsity)
    block = sparsity_block(modules, sparsity, allocation, estimator, epsilon, sparser, prefill, tuning)
    command = "acttail-export " + shlex.join(sys.argv[1:])
    card = model_card(source.origin, command, block, modules, "apache-2.0" if model is None else None)
    write_checkpoint(source, out, block, card, overwrite, None if is_gguf else _torch_dtype(dtype))
    _print_summary(modules, verbose)
    click.echo(f"effective sparsity {block['effective_sparsity']:.4f} (target {sparsity}); "
               f"wrote {out} in {time.perf_counter() - start:.1f} s")


def _tune(ctx: click.Context, source, text: str) -> tuple[dict, dict]:
    """The spectra and the block ``--epsilon auto`` chooses, for the export options in ``ctx``.

    The model and the calibration windows come before the spectra, so that a text too short fails at once.
    """
    options = ctx.params
    model, tokenizer = load_for_tuning(source)
    windows = calibration_windows(tokenizer, text, options["calibration_seqlen"], options["calibration_windows"])
    spectra = compute_spectra(source, options["device"])

    def narrowed(name: str, default: tuple[str, ...]) -> tuple[str, ...]:  # only an option the user named narrows it
        explicit = ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        return (options[name],) if explicit else default

    block = tune_block(model.to(options["device"]), source.projections, spectra, options["sparsity"], windows,
                       estimators=narrowed("estimator", ESTIMATORS), sparsers=narrowed("sparser", DIRECTIONS),
                       s_min=options["min_sparsity"], s_max=options["max_sparsity"],
                       text=options["calibration_text"] or "the bundled Wikipedia text",
                       log=lambda line: click.echo(line, err=True))
    return spectra, block


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda asked for, but torch sees no CUDA device")


def _print_summary(modules, verbose: bool) -> None:
    by_kind = defaultdict(list)
    for name, m in modules.items():
        by_kind[name.rsplit(".", 1)[-1]].append(m)
        if verbose:
            click.echo(f"{name:45s} alpha {m.alpha:6.3f}  sparsity {m.sparsity:.3f}  keep {m.keep}/{m.in_features}")
    click.echo(f"{'projection':10s} {'alpha mean':>10s} {'sparsity min':>12s} {'mean':>6s} {'max':>6s}")
    for kind, ms in by_kind.items():
        s = [m.sparsity for m in ms]
        click.echo(f"{kind:10s} {sum(m.alpha for m in ms) / len(ms):10.3f} {min(s):12.3f} {sum(s) / len(s):6.3f} {max(s):6.3f}")


@cli.command()
@click.argument("model", required=False)
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or Hub repo).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def analyze(model, gguf_file, device) -> None:
    """Print the Hill alpha of every projection of MODEL under each estimator (writes nothing)."""
    _check_device(device)
    source = resolve_model(model, gguf_file)
    spectra = compute_spectra(source, device)
    alphas = {estimator: alphas_from_spectra(spectra, estimator) for estimator in ESTIMATORS}
    click.echo(f"{'projection':45s} {'shape':>11s} " + " ".join(f"{e:>7s}" for e in ESTIMATORS))
    for p in source.projections:
        shape = f"{p.out_features}x{p.in_features}"
        click.echo(f"{p.name:45s} {shape:>11s} " + " ".join(f"{alphas[e][p.name]:7.3f}" for e in ESTIMATORS))


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="UTF-8 text file (default: the bundled English Wikipedia articles).")
@click.option("--seqlen", type=click.IntRange(2), default=512, show_default=True)
@click.option("--windows", type=click.IntRange(1), default=8, show_default=True)
@click.option("--dense-baseline", is_flag=True, help="For a checkpoint: also evaluate it with sparsity switched off.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with MODEL that is not acttail-export's own.")
def evaluate(model, text_file, seqlen, windows, dense_baseline, dtype, device, trust_remote_code) -> None:
    """Token perplexity of MODEL or an exported checkpoint on non-overlapping windows (Wanda convention)."""
    _check_device(device)
    text = read_text(text_file)
    loaded, tokenizer = load_model(model, _torch_dtype(dtype), trust_remote_code)
    loaded.to(device)
    ids = tokenize_windows(tokenizer, text, seqlen, windows)
    block = getattr(loaded.config, "activation_sparsity", None)
    rows = []
    if block is not None and dense_baseline:
        loaded.set_activation_sparsity(dense_block(block))
        rows.append(("dense (sparsity off)", perplexity(loaded, ids, desc="dense")))
        loaded.set_activation_sparsity(block)
    label = f"{block['method']} {block['effective_sparsity']:.3f} (prefill {block['prefill']})" if block else "dense"
    rows.append((label, perplexity(loaded, ids, desc="eval")))
    click.echo(f"token perplexity, {windows} windows x {seqlen} tokens of {text_file or 'bundled Wikipedia text'}:")
    for name, ppl in rows:
        click.echo(f"  {name:40s} {ppl:10.3f}")


@cli.command()
@click.argument("model", required=False)
@click.option("--prompt", default="Explain in two sentences what a printing press does.", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1), default=60, show_default=True)
@click.option("--raw", is_flag=True, help="Continue PROMPT as plain text instead of through the chat template.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with MODEL that is not acttail-export's own.")
def generate(model, prompt, max_new_tokens, raw, trust_remote_code) -> None:
    """Greedy-decode an answer to PROMPT (chat template when the tokenizer has one) with MODEL or a checkpoint."""
    loaded, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    if raw or not tokenizer.chat_template:
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = loaded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())


def main() -> None:
    """Console entry point: every failure is one line on stderr and a non-zero exit, never a traceback."""
    try:
        cli.main(prog_name="acttail-export", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 130)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except ExportError as e:
        _fail(str(e), 1)
    except OSError as e:
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)
    except Exception as e:  # a bug or an input no check foresaw: still one line, the traceback on request
        if os.environ.get("ACTTAIL_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (set ACTTAIL_DEBUG=1 for the traceback)", 1)


def _fail(message: str, code: int) -> None:
    click.echo(f"acttail-export: error: {' '.join(message.split())}", err=True)
    sys.exit(code)
