"""Which code a model folder makes transformers import, and whether it may run without --trust-remote-code.

With ``trust_remote_code=True``, transformers imports the module named by every ``auto_map`` entry of config.json and
tokenizer_config.json (a "file.Class" in the folder, or "repo--file.Class" from another Hub repo). Our checkpoints are
loaded that way, so every entry must name one of our own classes, in our own shipped files, byte-identical to this
package's copies (our files import only each other); anything else runs only when the user passes --trust-remote-code.
"""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import shipped_code_files
from .errors import ExportError
from .weights import SUPPORTED_ARCHITECTURES

__all__ = ["AUTO_MAP_FILES", "OUR_CLASSES", "foreign_code", "code_trust", "check_input_code"]

AUTO_MAP_FILES = ("config.json", "tokenizer_config.json")
# The auto_map values checkpoint.py writes: the only code that runs without --trust-remote-code.
OUR_CLASSES = frozenset(
    [f"configuration_acttail.ActTail{stem}Config" for stem in SUPPORTED_ARCHITECTURES.values()]
    + [f"modeling_acttail.ActTail{stem}ForCausalLM" for stem in SUPPORTED_ARCHITECTURES.values()]
)


def _auto_map_entries(folder: Path) -> list[tuple[str, str, object]]:
    """(file name, auto class, class reference) for every auto_map entry; a tokenizer entry is a [slow, fast] pair."""
    entries = []
    for name in AUTO_MAP_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            raise ExportError(f"{path} is not readable JSON: {e}") from e
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map is None:
            continue
        if not isinstance(auto_map, dict):
            entries.append((name, "auto_map", auto_map))
            continue
        for key, value in auto_map.items():
            refs = value if isinstance(value, list) else [value]
            entries += [(name, key, ref) for ref in refs if not (isinstance(value, list) and ref is None)]
    return entries


def foreign_code(folder: Path) -> str | None:
    """Why loading ``folder`` would import code that is not acttail-export's own, or None when it would not.

    :param folder: a local model folder or checkpoint
    """
    return _foreign(Path(folder), _auto_map_entries(Path(folder)))


def _foreign(folder: Path, entries: list[tuple[str, str, object]]) -> str | None:
    for file, key, ref in entries:
        if ref not in OUR_CLASSES:
            return f"{file} auto_map {key} names {ref!r}, which is not acttail-export's code"
    if entries:
        for ours in shipped_code_files():
            theirs = folder / ours.name
            if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
                return f"its {ours.name} differs from acttail-export's"
    return None


def code_trust(folder: Path, trust_remote_code: bool) -> bool:
    """The ``trust_remote_code`` to load ``folder`` with: True when it names only our verified code (or the user trusts
    it); refuses foreign code the user did not trust.

    :param trust_remote_code: the user's --trust-remote-code
    """
    entries = _auto_map_entries(Path(folder))
    reason = _foreign(Path(folder), entries)
    if reason is not None and not trust_remote_code:
        raise ExportError(f"{folder}: {reason}; pass --trust-remote-code to run it")
    return trust_remote_code or bool(entries)


def check_input_code(folder: Path) -> None:
    """Refuse an input model that names its own code: the exporter never runs it, and a checkpoint built on the stock
    architecture would silently differ from the model that code defines (its tokenizer code would also be copied)."""
    entries = _auto_map_entries(Path(folder))
    if entries:
        file, key, ref = entries[0]
        raise ExportError(f"{folder}: {file} auto_map {key} names {ref!r}: the model ships its own code, which "
                          "acttail-export does not run; only architectures transformers itself ships can be exported")
