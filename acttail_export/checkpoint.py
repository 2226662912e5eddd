"""Write an ActTail checkpoint: the input's weights, a config with the sparsity block, tokenizer, shipped code and a card.

Everything is written into a hidden temporary folder beside OUT and renamed into place at the end, so an export that fails
or is interrupted never leaves a folder that looks complete.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .allocation import ModuleSparsity, effective_sparsity
from .errors import BadOption, ExportError
from .modeling.activation_sparsity import FORMAT_VERSION, ActivationSparsity, ModuleSpec
from .weights import SUPPORTED_ARCHITECTURES, SourceModel

__all__ = ["TOKENIZER_FILES", "is_export", "check_one_path", "check_out", "remove_stale_partials",
           "restore_interrupted_swap", "shipped_code_files", "sparsity_block", "write_checkpoint", "replace_card"]

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
_SHIPPED_PACKAGES = ("acttail_export.modeling", "acttail_export.kernels")
# A full disk, a quota, or a file size limit: all mean "no room for the checkpoint".
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def shipped_code_files() -> list[Path]:
    """The .py files of modeling/ and kernels/ that go flat into every checkpoint (their only source)."""
    files = []
    for package in _SHIPPED_PACKAGES:
        files += [Path(str(f)) for f in resources.files(package).iterdir() if f.name.endswith(".py") and f.name != "__init__.py"]
    return sorted(files, key=lambda f: f.name)


def sparsity_block(modules: dict[str, ModuleSparsity], target: float, method: str, estimator: str, epsilon: float,
                   sparser: str, prefill: str | float = "sparse", mode: str = "topk", sites: str = "all",
                   thresholds: dict[str, float] | None = None, calibration: dict | None = None,
                   tuning: dict | None = None) -> dict:
    """The ``activation_sparsity`` block of config.json, checked by the same code that reads it back in a checkpoint.

    :param mode: "topk", or "threshold" with ``thresholds`` (module name -> t); ``keep`` stays the expected kept count
    :param sites: which projections the method sparsified ("all" or "mlp")
    :param calibration: what calibration saw (windows, seqlen, text, greedy settings), recorded when a method used it
    :param tuning: the search record of ``--epsilon auto`` (see :func:`acttail_export.tuning.tune_block`), if any
    """
    thresholds = thresholds or {}
    try:
        block = ActivationSparsity(
            format_version=FORMAT_VERSION, method=method, mode=mode, sites=sites, target_sparsity=target,
            effective_sparsity=round(effective_sparsity(modules), 6), estimator=estimator, epsilon=epsilon,
            sparser=sparser, prefill=prefill, calibration=calibration, tuning=tuning,
            modules={name: ModuleSpec(**m.to_dict(), threshold=thresholds.get(name)) for name, m in modules.items()},
        )
    except ValueError as e:
        raise ExportError(str(e)) from e
    return block.to_dict()


def _checkpoint_config(source: SourceModel, block: dict, dtype: torch.dtype | None) -> dict:
    stem = SUPPORTED_ARCHITECTURES[source.model_type]
    config = dict(source.config)
    config.update(
        model_type=f"acttail_{source.model_type}",
        base_model_type=source.model_type,
        architectures=[f"ActTail{stem}ForCausalLM"],
        auto_map={
            "AutoConfig": f"configuration_acttail.ActTail{stem}Config",
            "AutoModelForCausalLM": f"modeling_acttail.ActTail{stem}ForCausalLM",
        },
        activation_sparsity=block,
    )
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return config


def _copy_weights(source: SourceModel, dest: Path, dtype: torch.dtype | None, link: bool) -> OSError | None:
    """Copy the safetensors files byte for byte (hard-link them if ``link``), or convert floating tensors to ``dtype``
    one file at a time. Returns why a hard link failed (the files were copied instead), or None.

    Never a symbolic link: it would break when the input moves or the checkpoint is copied elsewhere."""
    total_bytes = 0
    link_failure = None
    for file in source.weight_files:
        if dtype is None and link and link_failure is None:
            try:
                os.link(file, dest / file.name)
                continue
            except OSError as e:  # another filesystem, or links not allowed there: copy
                link_failure = e
        if dtype is None:
            shutil.copyfile(file, dest / file.name)
            continue
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
            tensors = {}
            for key in f.keys():
                tensor = f.get_tensor(key)
                tensors[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                total_bytes += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, dest / file.name, metadata=metadata)
        del tensors
    index = source.folder / "model.safetensors.index.json"
    if index.is_file() and dtype is None:
        shutil.copyfile(index, dest / index.name)
    elif index.is_file():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total_bytes
        (dest / index.name).write_text(json.dumps(data, indent=2))
    return link_failure


def is_export(folder: Path) -> bool:
    """True if ``folder`` is a checkpoint this tool wrote: its config.json has our model_type and a sparsity block."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(config, dict) and str(config.get("model_type")).startswith("acttail_")
            and isinstance(config.get("activation_sparsity"), dict))


def check_one_path(path: Path) -> None:
    """``export PATH``: PATH is OUT and the default model is read; refuse when PATH looks like a model the user meant to
    export (it exists and is not one of our checkpoints), so that forgetting MODEL never touches it."""
    if Path(path).exists() and not is_export(path):
        raise BadOption(f"{path} exists and is not an acttail-export checkpoint; with one path, export takes it as OUT "
                        f"and reads the default model. To export it: acttail-export export {path} OUT --sparsity S")


def check_out(out: Path, overwrite: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an OUT that exists (unless ``overwrite`` and it is a previous export), is, holds or lies inside an input,
    is not a folder, or whose parent cannot be written.

    :param inputs: the input model's paths (what the user named, and the folder read): never replaced or written into
    """
    out = Path(out).absolute()
    for path in inputs:
        src, real = Path(path).resolve(), out.resolve()
        if src == real or src.is_relative_to(real):
            raise ExportError(f"{out} is or holds the input model {path}; choose another OUT")
        if real.is_relative_to(src):
            raise ExportError(f"{out} lies inside the input model {path}; choose another OUT")
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link; choose another OUT")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.exists() and not is_export(out):
        raise ExportError(f"{out} exists and is not an acttail-export checkpoint (--overwrite replaces only those); "
                          "choose another OUT")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(f"cannot write {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {out}: no permission to write in {parent}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _left_by_dead_exports(out: Path, kind: str) -> list[Path]:
    """The folders ``.OUT.<kind>-PID`` beside OUT whose export process no longer runs (SIGKILL, power loss)."""
    left = []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
        pid = folder.name.rsplit("-", 1)[1]
        if pid.isdigit() and folder.is_dir() and not folder.is_symlink() and not _alive(int(pid)):
            left.append(folder)
    return left


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders ``.OUT.partial-PID`` that a killed export left beside OUT; those of a running
    process are kept. Returns the removed folders."""
    removed = _left_by_dead_exports(Path(out).absolute(), "partial")
    for tmp in removed:
        shutil.rmtree(tmp)
    return removed


def _input_paths(source: SourceModel) -> list[Path]:
    named = Path(source.origin).expanduser()
    return [source.folder] + ([named] if named.exists() else [])


def restore_interrupted_swap(out: Path) -> list[str]:
    """Undo what an export killed between its two renames left (OUT moved aside to ``.OUT.old-PID``, the new one not
    yet in place, or in place with the old one not yet removed): with OUT missing the old checkpoint goes back to OUT,
    with OUT present the old one is removed (it was being replaced). Only folders of processes no longer running.
    Returns a line per folder handled."""
    out = Path(out).absolute()
    lines = []
    for old in _left_by_dead_exports(out, "old"):
        if out.exists() or out.is_symlink():
            shutil.rmtree(old)
            lines.append(f"removed {old.name}, the checkpoint an interrupted export had replaced")
        else:
            old.rename(out)
            lines.append(f"restored {out} from {old.name}, where an interrupted export had moved it")
    return lines


def write_checkpoint(source: SourceModel, out: Path, block: dict, card: dict[str, bytes], overwrite: bool = False,
                     dtype: torch.dtype | None = None, link_weights: bool = False,
                     log: Callable[[str], None] = lambda line: None) -> Path:
    """Write the checkpoint folder ``out`` atomically and return it.

    :param block: the ``activation_sparsity`` block (see :func:`sparsity_block`)
    :param card: the model card's files (README.md, figures) keyed by path inside the checkpoint (see ``card.card_files``)
    :param dtype: convert floating weights to this dtype; None keeps the files byte-identical
    :param link_weights: hard-link unconverted weight files instead of copying them (the checkpoint then shares them with
        the input: neither may be modified in place); where they cannot be linked they are copied, and ``log`` says so
    :param log: called with a line worth telling the user
    """
    out = Path(out).absolute()
    check_out(out, overwrite, _input_paths(source))
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        link_failure = _copy_weights(source, tmp, dtype, link_weights)
        if link_failure is not None:
            log(f"--link-weights: cannot hard-link {source.folder} into {out.parent} ({link_failure.strerror}); "
                "copied the weights instead")
        config = _checkpoint_config(source, block, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (source.folder / name).is_file():
                shutil.copyfile(source.folder / name, tmp / name)
        for file in shipped_code_files():
            shutil.copyfile(file, tmp / file.name)
        for name, content in card.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(content)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise ExportError(f"no space left to write {out} ({e.strerror}); nothing was written") from e
        if isinstance(e, OSError) and str(e.filename or "").startswith(str(tmp)):  # a write failed, not a read
            raise ExportError(f"could not write {out}: {e.strerror or e}; nothing was written") from e
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def replace_card(out: Path, card: dict[str, bytes]) -> None:
    """Replace the card files of a written checkpoint, each atomically (temp file + rename)."""
    for name, content in card.items():
        tmp = out / f"{name}.partial-{os.getpid()}"
        tmp.write_bytes(content)
        os.replace(tmp, out / name)
