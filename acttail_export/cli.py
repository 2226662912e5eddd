"""acttail-export: export, analyze, evaluate and try ActTail checkpoints.

Examples::

    acttail-export export out/smollm2-calibrated-50 --sparsity 0.5       # the embedded SmolLM2-135M-Instruct
    acttail-export export out/smollm2-acttail-50 --sparsity 0.5 --allocation acttail   # from the weights alone
    acttail-export export ./my-llama out/my-llama-70 --sparsity 0.7 --allocation acttail --estimator peak
    acttail-export export out/smollm2-teal-50 --sparsity 0.5 --allocation teal-greedy --mode threshold   # TEAL
    acttail-export export out/smollm2-calibrated-threshold-50 --sparsity 0.5 --mode threshold
    acttail-export export out/smollm2-dhar-30 --sparsity 0.3 --allocation uniform --mode threshold --sites mlp
    acttail-export analyze ./my-llama
    acttail-export eval out/smollm2-acttail-50 --windows 8 --dense-baseline
    acttail-export generate out/smollm2-acttail-50 --prompt "The Eiffel tower is"
    acttail-export push out/smollm2-acttail-50 my-org/smollm2-acttail-50 --private
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import click
import torch

from .allocation import ALLOCATIONS, DEFAULT_EPSILON, DEFAULT_SPARSER, DIRECTIONS, SITES
from .calibration import DEFAULT_GREEDY_WINDOWS, DEFAULT_SEQLEN, DEFAULT_WINDOWS, calibration_ids
from .compare import METHODS as COMPARE_METHODS
from .compare import calibrates
from .compare import compare as run_compare
from .compare import format_markdown, plot_results
from .compare import write_csv as write_compare_csv
from .checkpoint import check_one_path
from .errors import BadOption, ExportError
from .evaluate import (check_disjoint, check_seqlen, dense_block, is_checkpoint, load_in_process, load_model,
                       load_tokenizer, model_folder, perplexity, tokenize_windows)
from .greedy import DEFAULT_STEP
from .hub import push_checkpoint
from .modeling.activation_sparsity import MODES, PREFILL_MODES, validate_prefill
from .patterns import (DEFAULT_PATTERN_SPARSITY, capture_masks, format_table, model_sites, pattern_rows, plot_patterns,
                       write_csv)
from .pipeline import DEFAULT_ALLOCATION, DTYPES, EVAL_SEQLEN, EVAL_WINDOWS, ExportOptions, add_perplexity, check_device
from .pipeline import export as export_model
from .spectra import DEFAULT_ESTIMATOR, ESTIMATORS, SPECTRA_DTYPES, estimator_alphas, spectra_dtype
from .text import read_text
from .trust import check_input_code, foreign_code
from .weights import default_gguf, resolve_model



class Number(click.FloatRange):
    """click.FloatRange that also refuses NaN (every comparison with NaN is false, so the range lets it through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


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
        check_one_path(Path(paths[0]))
        return None, Path(paths[0])
    if len(paths) == 2:
        return paths[0], Path(paths[1])
    raise click.UsageError(f"expected [MODEL] OUT, got {len(paths)} arguments")


@click.group(help=__doc__.split("\n\n")[0])
def cli() -> None:
    pass


def _hub_options(command):
    """The options of a push, shared by ``push`` and ``export --push-to-hub``."""
    options = [
        click.option("--private", is_flag=True, help="Create the Hub repo private (an existing repo keeps its visibility)."),
        click.option("--revision", default=None, help="Branch to push to, created from main if missing (default: main)."),
        click.option("--commit-message", default=None, help="Message of the Hub commit."),
        click.option("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _push(out: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
          endpoint: str | None) -> None:
    url = push_checkpoint(out, repo_id, private=private, revision=revision, commit_message=commit_message,
                          endpoint=endpoint)
    click.echo(f"pushed {out} to {repo_id} ({revision or 'main'}): {url}")


@cli.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.argument("repo_id", metavar="ORG/NAME")
@_hub_options
def push(checkpoint, repo_id, private, revision, commit_message, endpoint) -> None:
    """Upload the checkpoint folder CHECKPOINT to the Hub repo ORG/NAME (created if missing; safe to repeat).

    The token is the one huggingface_hub finds: HF_TOKEN, else the one `hf auth login` saved.
    """
    _push(Path(checkpoint), repo_id, private, revision, commit_message, endpoint)


@cli.command()
@click.argument("paths", nargs=-1, metavar="[MODEL] OUT")
@click.option("--sparsity", type=Number(0, 1, max_open=True), required=True,
              help="Target sparsity S: mean over all projection parameters, in [0, 1).")
@click.option("--allocation", type=click.Choice(ALLOCATIONS), default=DEFAULT_ALLOCATION, show_default=True,
              help="calibrated (the default): per-projection loss-increase curves from forward and backward passes "
                   "over calibration text (--calibration-text, else the bundled text), guided by alpha (best quality, "
                   "under a minute on SmolLM2); acttail: per-projection alpha from the weights alone (no text, no "
                   "forward pass); block: per-block mean alpha; uniform: S everywhere; teal-greedy: TEAL's block-wise "
                   "greedy search on calibration text.")
@click.option("--mode", type=click.Choice(MODES), default="topk", show_default=True,
              help="topk: keep exactly k inputs per token; threshold: zero |x| <= a threshold calibrated per projection "
                   "(TEAL).")
@click.option("--sites", type=click.Choice(tuple(SITES)), default="all", show_default=True,
              help="Sparsify all seven projections, or only gate/up/down (mlp; the budget still counts all seven).")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default=DEFAULT_ESTIMATOR, show_default=True,
              help="xmin rule of the Hill alpha estimate.")
@click.option("--epsilon", default=str(DEFAULT_EPSILON), show_default=True, callback=lambda ctx, p, v: _parse_epsilon(v),
              help="Spread of the allocation: sparsities lie in eta * [1 - eps, 1 + eps] before clipping. auto: choose "
                   "estimator, sparser and epsilon by perplexity on calibration windows (an explicit --estimator or "
                   "--sparser restricts the search).")
@click.option("--sparser", type=click.Choice(DIRECTIONS), default=DEFAULT_SPARSER, show_default=True,
              help="Which projections get more sparsity: small alpha (heavy-tail) or large alpha (light-tail).")
@click.option("--min-sparsity", type=Number(0, 1, max_open=True), default=0.0, show_default=True,
              help="Lower clip bound of every projection's sparsity.")
@click.option("--max-sparsity", type=Number(0, 1, max_open=True), default=0.99, show_default=True,
              help="Upper clip bound of every projection's sparsity.")
@click.option("--prefill", default="sparse", show_default=True, callback=lambda ctx, p, v: _parse_prefill(v),
              help="Which prompt tokens are sparse: sparse (all), dense (none), or a fraction f (the last f).")
@click.option("--calibration-text", type=click.Path(), default=None,
              help="UTF-8 text for calibrated, teal-greedy, threshold mode and --epsilon auto; windows come from its end "
                   "(default: the bundled Wikipedia text, whose start eval uses).")
@click.option("--calibration-windows", type=click.IntRange(1), default=DEFAULT_WINDOWS, show_default=True,
              help="Calibration windows (TEAL used 10 x 2048 tokens; the default is sized for a CPU). Thresholds and "
                   "--epsilon auto read all N; the calibrated curves read min(N, 4) of them, teal-greedy's search "
                   "--greedy-windows.")
@click.option("--calibration-seqlen", type=click.IntRange(2), default=DEFAULT_SEQLEN, show_default=True,
              help="Tokens per calibration window.")
@click.option("--greedy-step", type=Number(0, 1, min_open=True, max_open=True), default=DEFAULT_STEP,
              show_default=True, help="teal-greedy: block sparsity added per accepted raise; blocks land within half "
                                      "of it of the target (TEAL's granularity is about 0.005, twice the search time).")
@click.option("--greedy-windows", type=click.IntRange(1), default=DEFAULT_GREEDY_WINDOWS, show_default=True,
              help="teal-greedy: how many calibration windows the search replays (its time grows with them).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Convert weights (default: keep files unchanged).")
@click.option("--gguf-file", default=None, help="GGUF file name inside MODEL (a folder or Hub repo).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for the spectra and the --epsilon auto trials.")
@click.option("--spectra-dtype", "spectra_dtype_name", type=click.Choice(SPECTRA_DTYPES), default="auto", show_default=True,
              help="Precision of the Gram matrices and eigenvalues; auto: float64 for the peak estimator, else float32.")
@click.option("--spectra-cache/--no-spectra-cache", default=True, show_default=True,
              help="Reuse (or store) the spectra in the cache folder, so re-exports at other settings skip them.")
@click.option("--eval", "run_eval", is_flag=True,
              help=f"Measure dense and sparse perplexity ({EVAL_WINDOWS} x {EVAL_SEQLEN} tokens from the start of the "
                   "bundled text) and put them in the model card; calibration windows of that text reaching into them "
                   "are refused.")
@click.option("--link-weights", is_flag=True,
              help="Hard-link the weight files instead of copying them (seconds instead of minutes at 7B; on another "
                   "filesystem they are copied, and a line says so). The checkpoint then shares them with MODEL: modify "
                   "neither in place.")
@click.option("--base-model", default=None, help="Hub id of MODEL for the card's metadata (default: MODEL if a Hub id).")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT if it is a previous acttail-export checkpoint (nothing else is ever replaced).")
@click.option("--verbose", is_flag=True, help="Print one line per projection.")
@click.option("--push-to-hub", metavar="ORG/NAME", default=None, help="After writing OUT, push it to this Hub repo.")
@_hub_options
@click.pass_context
def export(ctx, paths, sparsity, allocation, mode, sites, estimator, epsilon, sparser, min_sparsity, max_sparsity, prefill,
           calibration_text, calibration_windows, calibration_seqlen, greedy_step, greedy_windows, dtype, gguf_file,
           device, spectra_dtype_name, spectra_cache, run_eval, link_weights, base_model, overwrite, verbose,
           push_to_hub, private, revision, commit_message, endpoint) -> None:
    """Export MODEL (folder, Hub id or GGUF) to the ActTail checkpoint folder OUT.

    With one path, it is OUT and MODEL is the embedded SmolLM2-135M-Instruct; a path that exists must then be a previous
    export (so forgetting MODEL never touches a model folder).
    """
    model, out = _split_model_out(paths)
    if not push_to_hub and (private or revision or commit_message or endpoint):
        raise click.UsageError("--private, --revision, --commit-message and --endpoint go with --push-to-hub")

    def named(name: str):  # None when left at its default: --epsilon auto then searches every value
        return ctx.params[name] if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT else None

    options = ExportOptions(
        sparsity=sparsity, allocation=allocation, mode=mode, sites=sites, estimator=named("estimator"), epsilon=epsilon,
        sparser=named("sparser"), min_sparsity=min_sparsity, max_sparsity=max_sparsity, prefill=prefill,
        calibration_text=calibration_text, calibration_windows=calibration_windows,
        calibration_seqlen=calibration_seqlen, greedy_step=greedy_step, greedy_windows=greedy_windows, dtype=dtype,
        gguf_file=gguf_file, device=device, spectra_dtype=spectra_dtype_name, spectra_cache=spectra_cache,
        link_weights=link_weights, base_model=base_model, overwrite=overwrite, push_to_hub=push_to_hub,
        endpoint=endpoint)
    if not options.calibrates:
        _refuse_given(ctx, ("calibration_text", "calibration_windows", "calibration_seqlen"),
                      f"by --allocation {allocation} --mode {mode}, which reads no calibration text")
    if allocation != "teal-greedy":
        _refuse_given(ctx, ("greedy_step", "greedy_windows"),
                      f"by --allocation {allocation}: only teal-greedy searches")
    start = time.perf_counter()
    result = export_model(model, out, options, command="acttail-export " + shlex.join(sys.argv[1:]), log=click.echo,
                          evaluation=(EVAL_WINDOWS, EVAL_SEQLEN) if run_eval else None)
    _print_summary(result.modules, verbose)
    click.echo(f"effective sparsity {result.block['effective_sparsity']:.4f} (target {sparsity}); "
               f"wrote {out} in {time.perf_counter() - start:.1f} s")
    if run_eval:
        measured = add_perplexity(result)
        click.echo(f"token perplexity: dense {measured['dense']:.3f}, sparse {measured['sparse']:.3f} "
                   "(in the model card)")
    if push_to_hub:  # last: the pushed card carries the perplexity
        _push(out, push_to_hub, private, revision, commit_message, endpoint)


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
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device for the spectra.")
@click.option("--spectra-dtype", "spectra_dtype_name", type=click.Choice(SPECTRA_DTYPES), default="auto", show_default=True,
              help="Precision of the Gram matrices and eigenvalues, as for export; auto: float64 for peak, else float32.")
def analyze(model, gguf_file, device, spectra_dtype_name) -> None:
    """Print the Hill alpha of every projection of MODEL under each estimator: the alphas `export` writes with that
    estimator and --spectra-dtype (writes nothing but the spectra cache)."""
    check_device(device)
    source = resolve_model(model, gguf_file)
    alphas = estimator_alphas(source, ESTIMATORS, spectra_dtype_name, device)
    precision = ", ".join(f"{e} from {str(spectra_dtype(spectra_dtype_name, e)).removeprefix('torch.')}" for e in ESTIMATORS)
    click.echo(f"Hill alpha as export writes it with each estimator ({precision} spectra)")
    click.echo(f"{'projection':45s} {'shape':>11s} " + " ".join(f"{e:>8s}" for e in ESTIMATORS))
    for p in source.projections:
        shape = f"{p.out_features}x{p.in_features}"
        click.echo(f"{p.name:45s} {shape:>11s} " + " ".join(f"{alphas[e][p.name]:8.4f}" for e in ESTIMATORS))


@cli.command(name="eval")
@click.argument("model", required=False)
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="UTF-8 text file (default: the bundled English Wikipedia articles).")
@click.option("--seqlen", type=click.IntRange(2), default=512, show_default=True,
              help="Tokens per window (at most the model's positions).")
@click.option("--windows", type=click.IntRange(1), default=8, show_default=True,
              help="Non-overlapping windows from the start of the text.")
@click.option("--dense-baseline", is_flag=True, help="For a checkpoint: also evaluate it with sparsity switched off.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Precision the model is loaded in.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Device the model runs on.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with MODEL that is not acttail-export's own.")
def evaluate(model, text_file, seqlen, windows, dense_baseline, dtype, device, trust_remote_code) -> None:
    """Token perplexity of MODEL or an exported checkpoint on non-overlapping windows (Wanda convention)."""
    check_device(device)
    text = read_text(text_file)
    folder = model_folder(model)
    check_seqlen(folder, seqlen)
    loaded, tokenizer = load_model(folder, _torch_dtype(dtype), trust_remote_code)
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
@click.option("--prompt", default="Explain in two sentences what a printing press does.", show_default=True,
              help="What to answer (or, with --raw, continue); not empty.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=60, show_default=True,
              help="Most tokens to generate.")
@click.option("--raw", is_flag=True, help="Continue PROMPT as plain text instead of through the chat template.")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with MODEL that is not acttail-export's own.")
def generate(model, prompt, max_new_tokens, raw, trust_remote_code) -> None:
    """Greedy-decode an answer to PROMPT (chat template when the tokenizer has one) with MODEL or a checkpoint."""
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="'--prompt'")
    loaded, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    if raw or not tokenizer.chat_template:
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if inputs["input_ids"].shape[1] == 0:
        raise ExportError(f"the tokenizer turns the prompt {prompt!r} into no tokens")
    output = loaded.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    click.echo(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())


@cli.command()
@click.argument("model", required=False)
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="UTF-8 text file (default: the bundled English Wikipedia articles).")
@click.option("--sparsity", type=Number(0, 1, min_open=True, max_open=True), default=None,
              help="TopK sparsity S of every site of a dense model [default: 0.5]; a checkpoint uses its own keep counts.")
@click.option("--windows", type=click.IntRange(2), default=8, show_default=True, help="Consecutive windows (passages) from the start of the text.")
@click.option("--seqlen", type=click.IntRange(2), default=256, show_default=True, help="Tokens per window.")
@click.option("--max-distance", type=click.IntRange(1), default=4, show_default=True,
              help="Largest k for which layer l's active set predicts layer l+k's.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for patterns.csv and patterns.png "
              "[default: patterns-<model name>].")
@click.option("--trust-remote-code", is_flag=True, help="Run code shipped with MODEL that is not acttail-export's own.")
def patterns(model, text_file, sparsity, windows, seqlen, max_distance, out, trust_remote_code) -> None:
    """How predictable the TopK active set of MODEL (or a checkpoint) is, across windows of text and across depth."""
    checkpoint = is_checkpoint(model)
    if checkpoint and sparsity is not None:
        raise BadOption(f"{model} is a checkpoint: its keep counts set the active sets; --sparsity is for dense models")
    sparsity = sparsity or DEFAULT_PATTERN_SPARSITY
    text = read_text(text_file)
    source = model if checkpoint else resolve_model(model)  # resolved once: a Hub id or GGUF is fetched or converted
    folder = Path(model) if checkpoint else source.folder
    check_seqlen(folder, seqlen)
    name = Path(model or default_gguf()).name.removesuffix(".gguf")
    out = Path(out or f"patterns-{name}")
    if foreign_code(folder) is not None:  # not our runtime: only with --trust-remote-code, and then run as written
        loaded, tokenizer = load_model(folder, trust_remote_code=trust_remote_code)
    else:  # our runtime, built here: a checkpoint as it is, a dense model as plain Linears until the sites apply
        loaded, tokenizer = load_in_process(source), load_tokenizer(folder)
    out.mkdir(parents=True, exist_ok=True)
    ids = tokenize_windows(tokenizer, text, seqlen, windows)
    sites = model_sites(loaded, sparsity)
    rows = pattern_rows(capture_masks(loaded, ids, sites), sites, max_distance)
    what = "the checkpoint's keep counts" if checkpoint else f"sparsity {sparsity}"
    write_csv(rows, out / "patterns.csv")
    plot_patterns(rows, sites, out / "patterns.png", f"{name}: TopK active sets at {what}, {windows} windows x {seqlen} tokens")
    click.echo(f"Jaccard of TopK active sets ({what}), {windows} windows x {seqlen} tokens of "
               f"{text_file or 'bundled Wikipedia text'}; rand = independent random sets of the same sizes")
    click.echo(format_table(rows, sites))
    click.echo(f"wrote {out / 'patterns.csv'} and {out / 'patterns.png'}")


@cli.command(name="compare")
@click.argument("model", required=False)
@click.option("--sparsity", "sparsities", default="0.3,0.5,0.7", show_default=True,
              help="Comma-separated target sparsities.")
@click.option("--methods", default=",".join(COMPARE_METHODS), show_default=True,
              help="Comma-separated methods: " + ", ".join(COMPARE_METHODS) + ".")
@click.option("--prefill", "prefills", default="sparse", show_default=True,
              help="Comma-separated prefill policies, each sparse, dense or a fraction (the last f of each window).")
@click.option("--text", "text_file", type=click.Path(), default=None,
              help="Evaluation text (default: the bundled English Wikipedia articles; windows from its start).")
@click.option("--windows", type=click.IntRange(1), default=6, show_default=True,
              help="Evaluation windows from the start of the text.")
@click.option("--seqlen", type=click.IntRange(2), default=512, show_default=True,
              help="Tokens per window, evaluation and calibration (at most the model's positions).")
@click.option("--calibration-text", type=click.Path(), default=None,
              help="Calibration text for thresholds, the greedy search, the calibrated curves and auto (default: the "
                   "bundled text; windows from its end; where it is the evaluation text, windows that would overlap "
                   "the evaluation windows are refused).")
@click.option("--calibration-windows", type=click.IntRange(1), default=4, show_default=True,
              help="Calibration windows from the end of the calibration text.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for compare.csv, compare.md and compare.png (default: compare-<model name>).")
@click.pass_context
def compare_command(ctx, model, sparsities, methods, prefills, text_file, windows, seqlen, calibration_text,
                    calibration_windows, out) -> None:
    """Perplexity of each method at each sparsity on the same windows of MODEL (default: SmolLM2-135M-Instruct)."""
    targets = _parse_list(sparsities, float, "--sparsity", lambda s: 0 < s < 1)
    names = _parse_list(methods, str, "--methods", lambda m: m in COMPARE_METHODS)
    policies = [_parse_prefill(p) for p in prefills.split(",")]
    calibrating = any(map(calibrates, names))
    if not calibrating:
        _refuse_given(ctx, ("calibration_text", "calibration_windows"), f"by --methods {methods}: none of them "
                      f"calibrates (those that do: {', '.join(filter(calibrates, COMPARE_METHODS))})")
    text = read_text(text_file)
    calibration = read_text(calibration_text) if calibrating else None
    source = resolve_model(model)
    check_input_code(source.folder)
    check_seqlen(source.folder, seqlen)
    tokenizer = load_tokenizer(source.folder)
    eval_ids = tokenize_windows(tokenizer, text, seqlen, windows)
    calibration_ids_ = None
    if calibrating:
        if calibration == text:
            check_disjoint(tokenizer, text, (windows, seqlen), (calibration_windows, seqlen),
                           text_file or "the bundled Wikipedia text")
        calibration_ids_ = calibration_ids(source, calibration, calibration_windows, seqlen)
    out = Path(out or f"compare-{Path(source.origin.split()[0]).name}")
    header = (f"token perplexity of {source.origin}: {windows} windows x {seqlen} tokens from the start of "
              f"{text_file or 'the bundled Wikipedia text'}" + (
                  f"; calibration: {calibration_windows} windows x {seqlen} tokens from the end of "
                  f"{calibration_text or 'the bundled Wikipedia text'}" if calibrating else "") +
              ". Sparse tokens: prefill sparse = every token of every window; a fraction f = the last f of each "
              "window's tokens (loss over all tokens); dense = none.")
    click.echo(header)
    results = run_compare(source, targets, names, policies, eval_ids, calibration_ids_, log=click.echo)
    table = format_markdown(results)
    click.echo(table)
    out.mkdir(parents=True, exist_ok=True)  # only now: a compare that fails leaves no empty folder
    (out / "compare.md").write_text(header + "\n" + table)
    write_compare_csv(results, out / "compare.csv")
    plot_results(results, out / "compare.png", f"{Path(source.origin.split()[0]).name}: perplexity vs sparsity")
    click.echo(f"wrote {out}/compare.md, compare.csv, compare.png")


def _refuse_given(ctx, names, why: str) -> None:
    """Refuse the options of ``names`` that were given (not left at their defaults): they would be ignored."""
    given = [f"--{name.replace('_', '-')}" for name in names
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise BadOption(f"{' and '.join(given)} would be ignored {why}")


def _parse_list(value: str, kind, option: str, valid) -> list:
    try:
        items = [kind(v.strip()) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list: {value!r}", param_hint=option) from None
    bad = [v for v in items if not valid(v)]
    if not items or bad:
        raise click.BadParameter(f"invalid value {bad[0] if bad else value!r}", param_hint=option)
    return items


class Killed(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C's KeyboardInterrupt (a BaseException, so cleanup that catches
    BaseException runs and ``except Exception`` cannot swallow it), but passes click's KeyboardInterrupt handling."""


def _killed(signum, frame):
    raise Killed(signum)


def main() -> None:
    """Console entry point: every failure is one line on stderr and a non-zero exit, never a traceback.

    SIGTERM and SIGHUP (kill, a closed terminal) unwind like Ctrl-C, so an export cleans up its temporary folder and
    keeps the checkpoint it was replacing. Exit codes follow click: 2 for a usage error, 1 for a failure while running,
    128 + the signal number when interrupted.
    """
    if not sys.stderr.isatty():  # transformers' "Loading weights" bar, like ours, only on a terminal
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # transformers copies this setting when it is imported, which happens later
    handled = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _killed) for signum in handled}
    try:
        cli.main(prog_name="acttail-export", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # no arguments: the usage, as click prints it
        click.echo(e.ctx.get_help())
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail("interrupted", 128 + signal.SIGINT)
    except Killed as e:
        _fail(f"interrupted by {signal.Signals(e.args[0]).name}", 128 + e.args[0])
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except BadOption as e:
        _fail(str(e), 2)
    except ExportError as e:
        _fail(str(e), 1)
    except OSError as e:
        _fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1)
    except Exception as e:  # a bug or an input no check foresaw: still one line, the traceback on request
        if os.environ.get("ACTTAIL_DEBUG"):
            raise
        _fail(f"unexpected {type(e).__name__}: {e} (set ACTTAIL_DEBUG=1 for the traceback)", 1)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _fail(message: str, code: int) -> None:
    click.echo(f"acttail-export: error: {' '.join(message.split())}", err=True)
    sys.exit(code)
