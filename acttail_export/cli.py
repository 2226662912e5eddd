"""acttail-export: export, analyze, evaluate and try ActTail checkpoints.

Examples::

    acttail-export export out/smollm2-acttail-50 --sparsity 0.5          # the embedded SmolLM2-135M-Instruct
    acttail-export export ./my-llama out/my-llama-70 --sparsity 0.7 --estimator peak
    acttail-export export out/smollm2-teal-50 --sparsity 0.5 --allocation teal-greedy --mode threshold   # TEAL
    acttail-export export out/smollm2-dhar-30 --sparsity 0.3 --allocation uniform --mode threshold --sites mlp
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

from .allocation import ALLOCATIONS, DEFAULT_EPSILON, DEFAULT_SPARSER, DIRECTIONS, SITES, check_bounds, site_target
from .calibration import DEFAULT_GREEDY_WINDOWS, DEFAULT_SEQLEN, DEFAULT_WINDOWS, Calibration, calibration_ids
from .card import model_card
from .checkpoint import check_out, write_checkpoint
from .errors import ExportError
from .evaluate import dense_block, load_model, perplexity, tokenize_windows
from .greedy import DEFAULT_STEP
from .methods import Method, build_block
from .modeling.activation_sparsity import MODES, PREFILL_MODES, validate_prefill
from .spectra import DEFAULT_ESTIMATOR, ESTIMATORS, alphas_from_spectra, compute_spectra
from .text import read_text
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
              help="acttail: per-projection alpha; block: per-block mean alpha; uniform: S everywhere; teal-greedy: "
                   "TEAL's block-wise greedy search on calibration text.")
@click.option("--mode", type=click.Choice(MODES), default="topk", show_default=True,
              help="topk: keep exactly k inputs per token; threshold: zero |x| <= a threshold calibrated per projection "
                   "(TEAL).")
@click.option("--sites", type=click.Choice(tuple(SITES)), default="all", show_default=True,
              help="Sparsify all seven projections, or only gate/up/down (mlp; the budget still counts all seven).")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default=DEFAULT_ESTIMATOR, show_default=True,
              help="xmin rule of the Hill alpha estimate.")
@click.option("--epsilon", type=click.FloatRange(0, 1), default=DEFAULT_EPSILON, show_default=True,
              help="Spread of the allocation: sparsities lie in eta * [1 - eps, 1 + eps] before clipping.")
@click.option("--sparser", type=click.Choice(DIRECTIONS), default=DEFAULT_SPARSER, show_default=True,
              help="Which projections get more sparsity: small alpha (heavy-tail) or large alpha (light-tail).")
@click.option("--min-sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--max-sparsity", type=click.FloatRange(0, 1, max_open=True), default=0.99, show_default=True)
@click.option("--prefill", default="sparse", show_default=True, callback=lambda ctx, p, v: _parse_prefill(v),
              help="Which prompt tokens are sparse: sparse (all), dense (none), or a fraction f (the last f).")
@click.option("--calibration-text", type=click.Path(), default=None,
              help="UTF-8 text for threshold mode and teal-greedy; windows come from its end (default: the bundled "
                   "Wikipedia text, whose start eval uses).")
@click.option("--calibration-windows", type=click.IntRange(1), default=DEFAULT_WINDOWS, show_default=True,
              help="Calibration windows (TEAL used 10 x 2048 tokens; the default is sized for a CPU).")
@click.option("--calibration-seqlen", type=click.IntRange(2), default=DEFAULT_SEQLEN, show_default=True,
              help="Tokens per calibration window.")
@click.option("--greedy-step", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_STEP,
              show_default=True, help="teal-greedy: block sparsity added per accepted raise; blocks land within half "
                                      "of it of the target (TEAL's granularity is about 0.005, twice the search time).")
@click.option("--greedy-windows", type=click.IntRange(1), default=DEFAULT_GREEDY_WINDOWS, show_default=True,
              help="teal-greedy: how many calibration windows the search replays (its time grows with them).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Convert weights (default: keep files unchanged).")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or Hub repo).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True, help="Device for the spectra.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--verbose", is_flag=True, help="Print one line per projection.")
def export(paths, sparsity, allocation, mode, sites, estimator, epsilon, sparser, min_sparsity, max_sparsity, prefill,
           calibration_text, calibration_windows, calibration_seqlen, greedy_step, greedy_windows, dtype, gguf_file,
           device, overwrite, verbose) -> None:
    """Export MODEL (folder, Hub id or GGUF; default: SmolLM2-135M-Instruct) to the ActTail checkpoint folder OUT."""
    model, out = _split_model_out(paths)
    # Everything that can be checked before the spectra and the calibration is checked here, so bad input fails at once.
    check_out(out, overwrite)
    check_bounds(sparsity, min_sparsity, max_sparsity)
    _check_device(device)
    method = Method(allocation, mode, sites, estimator, epsilon, sparser, min_sparsity, max_sparsity, prefill, greedy_step)
    text = read_text(calibration_text) if method.needs_calibration else None
    start = time.perf_counter()
    is_gguf = model is None or gguf_file is not None or model.endswith(".gguf")
    source = resolve_model(model, gguf_file, _torch_dtype(dtype) if is_gguf else None)
    site_target(source.projections, sparsity, sites, max_sparsity)
    calibration = None
    if method.needs_calibration:
        ids = calibration_ids(source, text, calibration_windows, calibration_seqlen)
        calibration = Calibration(source, ids, calibration_text or "bundled Wikipedia text", greedy_windows)
    alphas = alphas_from_spectra(compute_spectra(source, device), estimator)
    block, modules = build_block(source, sparsity, method, alphas, calibration)
    command = "acttail-export " + shlex.join(sys.argv[1:])
    card = model_card(source.origin, command, block, modules, "apache-2.0" if model is None else None)
    write_checkpoint(source, out, block, card, overwrite, None if is_gguf else _torch_dtype(dtype))
    _print_summary(modules, verbose)
    click.echo(f"effective sparsity {block['effective_sparsity']:.4f} (target {sparsity}); "
               f"wrote {out} in {time.perf_counter() - start:.1f} s")


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
    label = "dense"
    if block:
        mode = " threshold" if block.get("mode") == "threshold" else ""
        sites = " mlp-only" if block.get("sites") == "mlp" else ""
        label = f"{block['method']}{mode}{sites} {block['effective_sparsity']:.3f} (prefill {block['prefill']})"
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
