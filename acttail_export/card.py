"""The model card (README.md) of an exported checkpoint."""

from __future__ import annotations

from .allocation import ModuleSparsity

__all__ = ["model_card"]

_ABOUT = (
    "This checkpoint runs with **ActTail** activation sparsity (arXiv 2603.12272): at every q, k, v, o, gate, up and down "
    "projection only the TopK largest-magnitude entries of the input vector are kept per token, so a decode step needs only "
    "the matching weight columns. Each projection gets its own sparsity, set from the heavy-tail exponent alpha of the "
    "empirical spectral density of its weight matrix (HT-SR theory), under a global budget. The weights are the input "
    "model's (dequantized if it was a GGUF file, converted if `--dtype` was given); the sparsity lives in `config.json` and "
    "the code shipped beside it."
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


def model_card(base_model: str, command: str, block: dict, modules: dict[str, ModuleSparsity],
               license_id: str | None = None) -> str:
    """README.md text: metadata, what ActTail is, how it was exported, how to load it, and the per-projection table."""
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "- custom_code", "- activation-sparsity", "- acttail"]
    if license_id:
        meta.append(f"license: {license_id}")
    meta.append("---")
    rows = [f"| `{name}` | {m.alpha:.3f} | {m.sparsity:.3f} | {m.keep} / {m.in_features} |" for name, m in modules.items()]
    return "\n".join([
        *meta,
        "",
        f"# {base_model}, ActTail {block['effective_sparsity']:.1%} activation sparsity",
        "",
        _ABOUT,
        "",
        f"- base model: {base_model}",
        f"- target sparsity {block['target_sparsity']}, effective {block['effective_sparsity']:.4f} "
        "(fraction of projection weights a decode step skips)",
        f"- allocation `{block['method']}`, estimator `{block['estimator']}`, epsilon {block['epsilon']}, "
        f"sparser `{block['sparser']}`, prefill `{block['prefill']}`",
        "",
        *_tuning_section(block.get("tuning")),
        "## Export command",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "PATH_OR_REPO_ID"',
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        'inputs = tokenizer("The theory of relativity", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=30)[0]))",
        "```",
        "",
        "`trust_remote_code=True` is required: without it transformers refuses the checkpoint's `model_type`.",
        "",
        "## Per-projection allocation",
        "",
        "| projection | alpha | sparsity | kept inputs |",
        "|---|---:|---:|---:|",
        *rows,
        "",
    ])
