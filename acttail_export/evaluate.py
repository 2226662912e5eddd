"""Load a dense model or an exported checkpoint, and measure token perplexity (Wanda convention)."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import BadOption, ExportError
from .modeling.activation_sparsity import ActivationSparsity
from .trust import code_trust
from .weights import SUPPORTED_ARCHITECTURES, SourceModel, resolve_model

__all__ = ["is_checkpoint", "model_folder", "check_block", "check_seqlen", "load_model", "load_in_process",
           "load_tokenizer", "dense_block", "perplexity", "zeroed_inputs", "measured_sparsity", "tokenize_windows",
           "calibration_windows", "check_disjoint"]


def is_checkpoint(path: str | None) -> bool:
    """True if ``path`` is a folder holding an ActTail checkpoint (config.json with an activation_sparsity block)."""
    if path is None or not (Path(path) / "config.json").is_file():
        return False
    try:
        return "activation_sparsity" in json.loads((Path(path) / "config.json").read_text())
    except json.JSONDecodeError:
        return False


def model_folder(model: str | None) -> Path:
    """The local folder of ``model``: a checkpoint as it is, anything else resolved (Hub download, GGUF conversion)."""
    return Path(model) if is_checkpoint(model) else resolve_model(model).folder


def check_block(folder: Path) -> None:
    """Check a checkpoint's ``activation_sparsity`` block before anything is imported or loaded from ``folder``."""
    block = json.loads((Path(folder) / "config.json").read_text()).get("activation_sparsity")
    try:
        if not isinstance(block, dict):
            raise ValueError(f"activation_sparsity must be a JSON object, got {block!r}")
        ActivationSparsity.from_dict(block)
    except ValueError as e:
        raise ExportError(f"{folder}/config.json: {e}") from e


def check_seqlen(folder: Path, seqlen: int, option: str = "--seqlen") -> None:
    """Refuse windows longer than the model's positions, before it loads (past them a forward pass runs for minutes
    and measures nothing the model was built for)."""
    try:
        positions = json.loads((Path(folder) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return  # loading reports an unreadable config
    if isinstance(positions, int) and seqlen > positions:
        raise BadOption(f"{option} {seqlen} is more than the {positions} positions of {folder}")


def load_model(model: str | Path | None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) for an exported checkpoint, a Hugging Face model folder / Hub id / GGUF, or None (default model).

    Code the folder names in an ``auto_map`` runs only if it is acttail-export's own, byte for byte, or when
    ``trust_remote_code`` is given (see :mod:`acttail_export.trust`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(None if model is None else str(model))
    if is_checkpoint(str(folder)):
        check_block(folder)
    trust = code_trust(folder, trust_remote_code)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load {folder}: {e}") from e
    return loaded.eval(), tokenizer


def load_in_process(model: SourceModel | str, dtype: torch.dtype = torch.float32):
    """``model`` built in this process by this package's runtime, the code every checkpoint ships: no checkpoint is
    written and no remote code is run. For the studies, which apply many blocks to one model.

    :param model: an input model, built as the ActTail class of its architecture without a block (plain Linears until
        ``set_activation_sparsity``), or the folder of an exported checkpoint (its block applied)
    """
    from .modeling import configuration_acttail, modeling_acttail  # here, not above: the runtime imports Triton and numba

    if isinstance(model, SourceModel):
        folder, model_type = model.folder, model.model_type
        config = {key: value for key, value in model.config.items() if key != "model_type"}
    else:  # a checkpoint: its config.json is the ActTail class's own
        folder, config = Path(model), None
        model_type = json.loads((folder / "config.json").read_text()).get("model_type", "").removeprefix("acttail_")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{folder}: unsupported architecture {model_type!r}; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    stem = SUPPORTED_ARCHITECTURES[model_type]
    config_class = getattr(configuration_acttail, f"ActTail{stem}Config")
    model_class = getattr(modeling_acttail, f"ActTail{stem}ForCausalLM")
    try:
        config = config_class.from_pretrained(folder) if config is None else config_class.from_dict(config)
        loaded = model_class.from_pretrained(folder, config=config, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ExportError(f"could not load {folder}: {e}") from e
    return loaded.eval()


def load_tokenizer(folder: Path):
    """The tokenizer saved in ``folder`` (never code shipped with it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ExportError(f"{folder} has no tokenizer that loads: {e}") from e


def dense_block(block: dict) -> dict:
    """A copy of an activation_sparsity block that keeps every input (the same model, sparsity switched off)."""
    return ActivationSparsity.from_dict(block).dense().to_dict()


def tokenize_windows(tokenizer, text: str, seqlen: int, windows: int) -> torch.Tensor:
    """The first ``windows`` non-overlapping windows of ``seqlen`` tokens of ``text``: ``[windows, seqlen]``."""
    needed = seqlen * windows
    chars = needed * 8  # enough characters for English text at any common tokenizer's rate; retried on the whole text
    ids = tokenizer(text[:chars], return_attention_mask=False)["input_ids"]
    if len(ids) < needed and chars < len(text):
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    if len(ids) < needed:
        raise ExportError(f"the text has {len(ids)} tokens, fewer than {windows} windows x {seqlen}")
    return torch.tensor(ids[:needed]).view(windows, seqlen)


def calibration_windows(tokenizer, text: str, seqlen: int, windows: int) -> torch.Tensor:
    """``windows`` windows of ``seqlen`` tokens from the *end* of ``text``: disjoint from :func:`tokenize_windows`'s
    evaluation windows (which come from the start) whenever the text holds both, so calibration never sees test tokens."""
    needed = seqlen * windows
    chars = needed * 8  # as in tokenize_windows: retried on the whole text (a tail of blank lines holds few tokens)
    ids = tokenizer(text[-chars:], return_attention_mask=False)["input_ids"]
    if len(ids) < needed and chars < len(text):
        ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    if len(ids) < needed:
        raise ExportError(f"the calibration text has {len(ids)} tokens, fewer than {windows} windows x {seqlen}")
    return torch.tensor(ids[-needed:]).view(windows, seqlen)


def check_disjoint(tokenizer, text: str, evaluation: tuple[int, int], calibration: tuple[int, int], name: str) -> None:
    """Refuse evaluation windows (from the start of ``text``, :func:`tokenize_windows`) and calibration windows (from
    its end, :func:`calibration_windows`) that would share tokens.

    :param evaluation: (windows, seqlen) of the evaluation; ``calibration`` the same for the calibration
    :param name: the text as the error line names it
    """
    head, tail = evaluation[0] * evaluation[1], calibration[0] * calibration[1]

    def count(part: str) -> int:
        return len(tokenizer(part, return_attention_mask=False)["input_ids"])

    # each takes its tokens from the slice of 8 characters a token it tokenizes: disjoint slices, disjoint windows
    if 8 * (head + tail) <= len(text) and count(text[:8 * head]) >= head and count(text[-8 * tail:]) >= tail:
        return
    total = count(text)
    if total < head + tail:
        raise BadOption(f"the evaluation windows ({evaluation[0]} x {evaluation[1]} tokens from the start of {name}) and "
                        f"the calibration windows ({calibration[0]} x {calibration[1]} from its end) would overlap: it "
                        f"has {total} tokens; use fewer windows, shorter ones, or another calibration text")


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, progress: bool = True, desc: str = "eval") -> float:
    """exp of the mean next-token loss over all windows, each window evaluated on its own (no context carried over).

    :param windows: ``[N, seqlen]`` token ids
    """
    total_nll, count = 0.0, 0
    device = next(model.parameters()).device
    for window in tqdm(windows, desc=desc, unit="window", disable=None if progress else True):
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total_nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(total_nll / count)


@contextmanager
def zeroed_inputs(model):
    """Count what a loaded ActTail model's projections zero while the block runs; yields a function that returns the
    fraction of projection inputs zeroed so far, weighted by each projection's parameters like the effective sparsity
    (for TopK it equals the effective sparsity; for thresholds it is measured on whatever text the model ran)."""
    zeroed: dict[str, list[float]] = {}  # name -> [zeroed entries, entries]

    def count(name):
        def hook(module, args):
            counts = zeroed.setdefault(name, [0.0, 0.0])
            counts[0] += float((module.sparsify(args[0]) == 0).sum())
            counts[1] += args[0].numel()
        return hook

    modules = model.topk_modules()
    params = {name: m.in_features * m.out_features for name, m in modules.items()}

    def fraction() -> float:
        # sum_p n_p * (zeroed_p / entries_p) / sum_p n_p, with n_p = d_out_p * d_in_p
        return sum(params[name] * z / n for name, (z, n) in zeroed.items()) / sum(params[name] for name in zeroed)

    hooks = [module.register_forward_pre_hook(count(name)) for name, module in modules.items()]
    try:
        yield fraction
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def measured_sparsity(model, windows: torch.Tensor) -> float:
    """The fraction of projection inputs a loaded ActTail model zeroes on ``windows`` (see :func:`zeroed_inputs`).

    :param windows: ``[N, seqlen]`` token ids
    """
    device = next(model.parameters()).device
    with zeroed_inputs(model) as fraction:
        for window in windows:
            model(input_ids=window[None].to(device), use_cache=False)
        return fraction()
