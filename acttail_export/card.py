"""The model card of an exported checkpoint: README.md (Hub metadata, what ActTail is, how to load it) and its figures."""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
from huggingface_hub import ModelCardData, metadata_load  # noqa: E402

from .allocation import ModuleSparsity  # noqa: E402
from .modeling.projections import PROJECTION_KINDS, parse_projection  # noqa: E402

__all__ = ["CardFacts", "card_files", "inherited_license"]

FIGURE_PER_LAYER = "figures/alpha_and_sparsity_per_layer.png"
FIGURE_HISTOGRAM = "figures/sparsity_histogram.png"

_ABOUT = (
    "This checkpoint runs with **ActTail** activation sparsity (arXiv 2603.12272): at every q, k, v, o, gate, up and down "
    "projection only the TopK largest-magnitude entries of the input vector are kept per token, so a decode step reads only "
    "the matching weight columns. {allocation} "
    "The weights are the input model's, unchanged (dequantized if it was a GGUF file, converted if `--dtype` was given); "
    "the sparsity lives in `config.json` and the code shipped beside it."
)
_ALPHA = "the heavy-tail exponent alpha of the empirical spectral density of its weight matrix (HT-SR theory)"
_BUDGET = "under a global budget over all projection weights."
# How each allocation (the block's `method`) set the sparsities, for the paragraph above
_ALLOCATIONS = {
    "acttail": f"Each projection gets its own sparsity, set from {_ALPHA}, {_BUDGET}",
    "calibrated": "Each projection gets its own sparsity from its loss-increase curve (forward and backward "
                  f"passes over calibration text), guided by {_ALPHA}, {_BUDGET}",
    "block": "Each decoder block gets its own sparsity, set from the mean heavy-tail exponent alpha of its projections' "
             f"weight matrices (HT-SR theory), {_BUDGET}",
    "teal-greedy": f"Each projection gets its own sparsity from TEAL's block-wise greedy search on calibration text, {_BUDGET}",
    "uniform": "Every projection gets the same sparsity, the target.",
}

_THRESHOLD_MODE = (
    "- runtime mode `threshold` (TEAL): instead of TopK, every input entry with |x| <= its projection's threshold is "
    "zeroed; the thresholds are quantiles of |x| on calibration text, so the kept count varies per token and the table "
    "gives its expected value"
)


def _tuning_section(tuning: dict | None) -> list[str]:
    """The ``--epsilon auto`` search: what it scored, on which windows, and every trial."""
    if tuning is None:
        return []
    chosen = tuning["chosen"]
    rows = [f"| `{t['estimator']}` | `{t['sparser']}` | {t['epsilon']:.3f}{' (uniform)' * (t['epsilon'] == 0)} | "
            f"{t['perplexity']:.3f} |" for t in tuning["trials"]]
    return [
        "## Auto-tuning",
        "",
        f"`--epsilon auto` chose estimator `{chosen['estimator']}`, sparser `{chosen['sparser']}`, epsilon "
        f"{chosen['epsilon']:.3f} by {tuning['objective']}: {tuning['windows']} windows x {tuning['seqlen']} tokens "
        f"from the end of {tuning['text']} (disjoint from evaluation windows taken from its start).",
        "",
        "| estimator | sparser | epsilon | calibration perplexity |",
        "|---|---|---:|---:|",
        *rows,
        "",
    ]


@dataclass(frozen=True)
class CardFacts:
    """What the card says about where the checkpoint came from and how it was measured.

    :param base_model: Hub id of the input model, when known (goes into the metadata, so it must be a real id)
    :param origin: what the user named as input (path, Hub id or GGUF), for the text
    :param repo_id: Hub repo the checkpoint is pushed to, for the usage snippet
    :param perplexity: ``{"dense": ..., "sparse": ..., "windows": ..., "seqlen": ..., "text": ...}`` from ``--eval``
    """

    origin: str
    command: str
    base_model: str | None = None
    license: str | None = None
    repo_id: str | None = None
    perplexity: dict | None = None


def inherited_license(folder: Path) -> str | None:
    """The ``license`` in the YAML metadata of the input model's README.md, if it has one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        return (metadata_load(readme) or {}).get("license")
    except Exception:  # malformed YAML in someone else's card must not stop an export
        return None


def card_files(facts: CardFacts, block: dict, modules: dict[str, ModuleSparsity]) -> dict[str, bytes]:
    """README.md and the PNG figures it shows, keyed by their path inside the checkpoint."""
    return {
        "README.md": _readme(facts, block, modules).encode(),
        FIGURE_PER_LAYER: _png(_per_layer_figure(modules)),
        FIGURE_HISTOGRAM: _png(_histogram_figure(modules)),
    }


def _readme(facts: CardFacts, block: dict, modules: dict[str, ModuleSparsity]) -> str:
    metadata = ModelCardData(
        library_name="transformers",
        base_model=facts.base_model,
        license=facts.license,
        pipeline_tag="text-generation",
        tags=["custom_code", "activation-sparsity", "acttail"],
    )
    by_threshold = block.get("mode", "topk") == "threshold"
    rows = [f"| `{name}` | {m.alpha:.3f} | {m.sparsity:.3f} | {m.keep} / {m.in_features} |"
            + (f" {block['modules'][name]['threshold']:.6g} |" if by_threshold else "") for name, m in modules.items()]
    return "\n".join([
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# {facts.origin}, ActTail {block['effective_sparsity']:.1%} activation sparsity",
        "",
        _ABOUT.format(allocation=_ALLOCATIONS[block["method"]]),
        "",
        f"- input model: {facts.origin}",
        f"- target sparsity {block['target_sparsity']}, effective {block['effective_sparsity']:.4f} "
        "(fraction of projection weights a decode step skips)",
        f"- allocation `{block['method']}`, estimator `{block['estimator']}`, epsilon {block['epsilon']}, "
        f"sparser `{block['sparser']}`, prefill `{block['prefill']}`, sites `{block.get('sites', 'all')}`",
        *([_THRESHOLD_MODE] if by_threshold else []),
        *([_calibration_line(block)] if "calibration" in block else []),
        *_perplexity_lines(facts.perplexity, block),
        "",
        *_tuning_section(block.get("tuning")),
        "## Export command",
        "",
        "```bash",
        facts.command,
        "```",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{facts.repo_id or "PATH_OR_REPO_ID"}"',
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        'inputs = tokenizer("The theory of relativity", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0]))",
        "```",
        "",
        "`trust_remote_code=True` is required: without it transformers refuses the checkpoint's `model_type`. Decode steps "
        "use Triton kernels on CUDA and a gather path on CPU (float32); everything else is the base architecture.",
        "",
        "## Allocation",
        "",
        f"![alpha and sparsity per layer]({FIGURE_PER_LAYER})",
        "",
        f"![histogram of sparsities]({FIGURE_HISTOGRAM})",
        "",
        "| projection | alpha | sparsity | kept inputs |" + (" threshold |" if by_threshold else ""),
        "|---|---:|---:|---:|" + ("---:|" if by_threshold else ""),
        *rows,
        "",
    ])


def _calibration_line(block: dict) -> str:
    """How the allocation (and thresholds) were calibrated: method, text, windows."""
    info = block["calibration"]
    seen = f"{info['windows']} windows x {info['seqlen']} tokens from the end of {info['text']}"
    if "curve_windows" in info:
        prior = info.get("acttail_prior", 0)
        return (f"- calibration: allocation `calibrated`: per projection, a Fisher estimate of the loss increase at "
                f"each sparsity ({info['curves']}), from forward and backward passes over the first "
                f"{info['curve_windows']} of {seen}, the budget split where every projection's marginal cost per "
                f"skipped weight is equal" + (f", blended with ActTail's alpha allocation (weight {prior})" if prior else "")
                + ("; thresholds calibrated on all of them" if block.get("mode") == "threshold" else ""))
    if "greedy_step" in info:
        return (f"- calibration: TEAL's block-wise greedy search (step {info['greedy_step']}) on the first "
                f"{info['greedy_windows']} of {seen}"
                + ("; thresholds calibrated on all of them" if block.get("mode") == "threshold" else ""))
    return f"- calibration: thresholds from {seen}"


def _perplexity_lines(perplexity: dict | None, block: dict) -> list[str]:
    if not perplexity:
        return []
    return [
        f"- token perplexity on {perplexity['windows']} windows x {perplexity['seqlen']} tokens of {perplexity['text']} "
        f"(prefill `{block['prefill']}`): **{perplexity['sparse']:.3f}**, dense {perplexity['dense']:.3f}",
    ]


def _by_kind(modules: dict[str, ModuleSparsity]) -> dict[str, list[tuple[int, ModuleSparsity]]]:
    by_kind = defaultdict(list)
    for name, m in modules.items():
        layer, kind = parse_projection(name)
        by_kind[kind].append((layer, m))
    return {kind: sorted(by_kind[kind], key=lambda item: item[0]) for kind in PROJECTION_KINDS if kind in by_kind}


def _per_layer_figure(modules: dict[str, ModuleSparsity]):
    """alpha (top) and sparsity (bottom) against layer, one line per projection type (as in the ActTail figures)."""
    fig, (ax_alpha, ax_sparsity) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for kind, items in _by_kind(modules).items():
        layers = [layer for layer, _ in items]
        ax_alpha.plot(layers, [m.alpha for _, m in items], marker="o", markersize=3, label=kind)
        ax_sparsity.plot(layers, [m.sparsity for _, m in items], marker="o", markersize=3, label=kind)
    ax_alpha.set_ylabel("Hill alpha of the weight ESD")
    ax_alpha.set_title("Heavy-tail exponent per projection (smaller = heavier tail)")
    ax_sparsity.set_ylabel("activation sparsity")
    ax_sparsity.set_xlabel("decoder layer")
    ax_sparsity.set_title("Allocated sparsity per projection")
    ax_sparsity.set_ylim(-0.02, 1.02)
    for ax in (ax_alpha, ax_sparsity):
        ax.grid(alpha=0.3)
    ax_alpha.legend(ncol=7, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.03), frameon=False)
    fig.tight_layout()
    return fig


def _histogram_figure(modules: dict[str, ModuleSparsity]):
    """How many projections got each sparsity, stacked by projection type."""
    by_kind = _by_kind(modules)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([[m.sparsity for _, m in items] for items in by_kind.values()], bins=50, range=(0, 1), stacked=True,
            label=list(by_kind))
    ax.set_xlabel("activation sparsity")
    ax.set_ylabel("projections")
    ax.set_title("Histogram of allocated sparsities")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
