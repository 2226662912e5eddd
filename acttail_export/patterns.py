"""How predictable the TopK active set is (Dhar et al.): its overlap across different inputs and across depth.

The *active set* of a projection input at one token is the set of its ``keep`` entries of largest |x| (the TopK mask of
:func:`~acttail_export.kernels.topk.topk_mask`). A *site* is one distinct input per layer: for a dense model the four
vectors the seven projections read (``attn_in`` = q/k/v input, ``o_in``, ``mlp_in`` = gate/up input, ``down_in`` = the
d_ff neurons), all at one sparsity S; for an exported checkpoint every sparsified projection with its own keep count.

Statistics (pure functions on bool masks ``[..., d]``), each reported beside the value independent random sets of the same
sizes would give (see :func:`chance_jaccard`):

- ``token``: mean Jaccard of the active sets of two tokens from *different* windows (random pairs, seeded);
- ``hot``: mean Jaccard, over all pairs of windows, of the windows' *hot sets*: the ``keep`` inputs active at the most tokens
  of that window (ties broken at random), i.e. the set one would prefetch for that passage (longer windows give steadier
  counts, so this overlap grows with the window length);
- ``depth``: for each distance k, the active set of layer l as a prediction of layer l+k's at the same token and site:
  Jaccard, precision |A_l & A_l+k| / |A_l| and recall |A_l & A_l+k| / |A_l+k|, mean over tokens. Only the residual-stream
  sites (``attn_in``, ``mlp_in``; q/k/v/gate/up) index the same coordinates in every layer; for ``o_in`` and ``down_in`` the
  index i of layer l and of layer l+k are unrelated units, so chance is the expected answer there.

Capture is separate from statistics (:func:`capture_masks`), and plotting from both (:func:`plot_patterns`).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .allocation import keep_count
from .evaluate import dense_block
from .kernels.topk import topk_mask
from .modeling.projections import INPUTS, PROJECTION_KINDS, parse_projection

__all__ = [
    "DENSE_SITES",
    "STATISTICS",
    "Site",
    "PatternRow",
    "DEFAULT_PATTERN_SPARSITY",
    "dense_sites",
    "checkpoint_sites",
    "model_sites",
    "capture_masks",
    "jaccard",
    "chance_jaccard",
    "cross_window_token_jaccard",
    "hot_sets",
    "mean_pairwise_jaccard",
    "depth_overlap",
    "pattern_rows",
    "write_csv",
    "format_table",
    "plot_patterns",
]

# site -> the projection kind whose input it is (for a dense model; the other kinds at that input read the same vector)
DENSE_SITES = {site: kinds[0] for site, kinds in INPUTS.items()}
DEFAULT_PATTERN_SPARSITY = 0.5
STATISTICS = ("token", "hot", "depth", "depth_precision", "depth_recall")


@dataclass(frozen=True)
class Site:
    """One projection input per layer, read by the projection kind ``projection`` ("q" ... "down"): ``keeps[layer]`` is
    the active-set size at that layer, out of ``dim``."""

    name: str
    projection: str
    dim: int
    keeps: dict[int, int]


@dataclass(frozen=True)
class PatternRow:
    """One number: ``statistic`` (see STATISTICS) of ``site`` at ``layer`` (and ``distance`` k for the depth ones)."""

    site: str
    layer: int
    statistic: str
    distance: int
    value: float
    chance: float


# ----------------------------------------------------------------------------------------------------------- sites, capture

def _projection_modules(model) -> dict[tuple[int, str], torch.nn.Module]:
    """(layer, kind) -> module of every decoder projection of ``model``."""
    return {parsed: module for name, module in model.named_modules() if (parsed := parse_projection(name))}


def dense_sites(model, sparsity: float) -> list[Site]:
    """The four distinct projection inputs of every layer, each keeping k = round((1 - S) d) per token."""
    modules = _projection_modules(model)
    layers = sorted({layer for layer, _ in modules})
    sites = []
    for name, projection in DENSE_SITES.items():
        dim = modules[layers[0], projection].in_features
        sites.append(Site(name, projection, dim, {layer: keep_count(sparsity, dim) for layer in layers}))
    return sites


def checkpoint_sites(block: dict) -> list[Site]:
    """Every sparsified projection of an ``activation_sparsity`` block, with its own keep count per layer."""
    by_kind: dict[str, dict[int, int]] = {}
    dims = {}
    for name, spec in block["modules"].items():
        layer, kind = parse_projection(name)
        by_kind.setdefault(kind, {})[layer] = spec["keep"]
        dims[kind] = spec["in_features"]
    return [Site(f"{kind}_proj", kind, dims[kind], dict(sorted(by_kind[kind].items())))
            for kind in PROJECTION_KINDS if kind in by_kind]


def model_sites(model, sparsity: float) -> list[Site]:
    """The sites of a loaded model: a checkpoint's own projections (its sparsity switched off, so that the captured inputs
    are the dense ones), else the four inputs of a dense model at ``sparsity``."""
    block = getattr(model.config, "activation_sparsity", None)
    if block is None:
        return dense_sites(model, sparsity)
    model.set_activation_sparsity(dense_block(block))
    return checkpoint_sites(block)


def _mask_hook(store: list[torch.Tensor], keep: int):
    def hook(module, args):
        x = args[0]  # [1, T, d]
        store.append(topk_mask(x.reshape(-1, x.shape[-1]).float(), keep))

    return hook


@torch.inference_mode()
def capture_masks(model, windows: torch.Tensor, sites: list[Site], progress: bool = True) -> dict[str, dict[int, torch.Tensor]]:
    """Active-set masks of every site and layer: ``masks[site][layer]`` is ``[W, T, d]`` bool, one dense forward per window.

    Forward pre-hooks see each projection's input before any sparsification, so run a checkpoint with sparsity off.

    :param windows: ``[W, T]`` token ids
    """
    modules = _projection_modules(model)
    stores = {(site.name, layer): [] for site in sites for layer in site.keeps}
    handles = [modules[layer, site.projection].register_forward_pre_hook(_mask_hook(stores[site.name, layer], keep))
               for site in sites for layer, keep in site.keeps.items()]
    try:
        for window in tqdm(windows, desc="capture", unit="window", disable=None if progress else True):
            model.base_model(input_ids=window[None], use_cache=False)  # the decoder only: lm_head plays no part
    finally:
        for handle in handles:
            handle.remove()
    return {site.name: {layer: torch.stack(stores[site.name, layer]) for layer in site.keeps} for site in sites}


# ---------------------------------------------------------------------------------------------------------------- statistics

def _sizes(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float32 sums: exact for any d < 2**24, and faster than torch's integer sums of bools
    return (a & b).sum(-1, dtype=torch.float32), a.sum(-1, dtype=torch.float32), b.sum(-1, dtype=torch.float32)


def _jaccard(both: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor) -> torch.Tensor:
    union = size_a + size_b - both
    return torch.where(union > 0, both / union.clamp(min=1), 1.0)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|A & B| / |A | B| of each pair of rows of two bool masks ``[..., d]`` (1 where both sets are empty)."""
    return _jaccard(*_sizes(a, b))


def chance_jaccard(size_a: int, size_b: int, dim: int) -> float:
    """Jaccard of independent uniformly random sets of sizes a and b out of d, as E|A & B| / E|A | B|.

    E|A & B| = ab/d, so chance = i / (a + b - i) with i = ab/d; k / (2d - k) for a = b = k. The exact mean of the ratio
    differs from this by less than 0.001 for d >= 100 (the intersection's spread is small against its mean).
    """
    intersection = size_a * size_b / dim
    return intersection / (size_a + size_b - intersection)


def cross_window_token_jaccard(masks: torch.Tensor, pairs: int = 4096, seed: int = 0) -> float:
    """Mean Jaccard of the active sets of ``pairs`` random token pairs, the two tokens from different windows.

    :param masks: ``[W, T, d]`` bool, W >= 2
    """
    windows, tokens, _ = masks.shape
    assert windows >= 2, f"need two windows, got {windows}"
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(windows, (pairs,), generator=generator)
    second = (first + torch.randint(1, windows, (pairs,), generator=generator)) % windows  # any window but ``first``
    token_a, token_b = torch.randint(tokens, (2, pairs), generator=generator)
    return jaccard(masks[first, token_a], masks[second, token_b]).mean().item()


def hot_sets(masks: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Each window's ``size`` inputs active at the most tokens, ties broken at random: ``[W, d]`` bool.

    A fixed tie rule (lowest index) would pick the same inputs in every window and lift the overlap above chance.

    :param masks: ``[W, T, d]`` bool
    """
    counts = masks.sum(1, dtype=torch.float32)
    jitter = torch.rand(counts.shape, generator=torch.Generator().manual_seed(seed))  # < 1: orders only equal counts
    return topk_mask(counts + jitter, size)


def mean_pairwise_jaccard(sets: torch.Tensor) -> float:
    """Mean Jaccard over all pairs of rows of ``sets`` ``[N, d]`` bool, N >= 2."""
    first, second = zip(*combinations(range(sets.shape[0]), 2))
    return jaccard(sets[list(first)], sets[list(second)]).mean().item()


def depth_overlap(early: torch.Tensor, late: torch.Tensor) -> tuple[float, float, float]:
    """(Jaccard, precision, recall) of ``early`` as a prediction of ``late``, token by token, mean over tokens.

    precision = |E & L| / |E| (predicted inputs that are active), recall = |E & L| / |L| (active inputs that were predicted).

    :param early: ``[..., d]`` bool, the active sets at layer l
    :param late: ``[..., d]`` bool, the same tokens' active sets at layer l + k
    """
    both, size_early, size_late = _sizes(early, late)
    scores = (_jaccard(both, size_early, size_late), both / size_early.clamp(min=1), both / size_late.clamp(min=1))
    return tuple(score.mean().item() for score in scores)


def pattern_rows(masks: dict[str, dict[int, torch.Tensor]], sites: list[Site], max_distance: int,
                 pairs: int = 4096, seed: int = 0) -> list[PatternRow]:
    """Every statistic of every site and layer (depth ones for k = 1..max_distance where layer l + k exists)."""
    rows = []
    for site in sites:
        for layer, keep in site.keeps.items():
            mask = masks[site.name][layer]
            chance = chance_jaccard(keep, keep, site.dim)
            rows.append(PatternRow(site.name, layer, "token", 0, cross_window_token_jaccard(mask, pairs, seed), chance))
            rows.append(PatternRow(site.name, layer, "hot", 0, mean_pairwise_jaccard(hot_sets(mask, keep, seed)), chance))
            for distance in range(1, max_distance + 1):
                later = layer + distance
                if later not in site.keeps:
                    continue
                late_keep = site.keeps[later]
                values = depth_overlap(mask, masks[site.name][later])
                chances = (chance_jaccard(keep, late_keep, site.dim), late_keep / site.dim, keep / site.dim)
                for statistic, value, chance in zip(STATISTICS[2:], values, chances):
                    rows.append(PatternRow(site.name, layer, statistic, distance, value, chance))
    return rows


# ------------------------------------------------------------------------------------------------------------------- output

def write_csv(rows: list[PatternRow], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(PatternRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) | {"value": f"{row.value:.6f}", "chance": f"{row.chance:.6f}"} for row in rows)


def _lookup(rows: list[PatternRow]) -> dict[tuple[str, int, str, int], PatternRow]:
    return {(r.site, r.layer, r.statistic, r.distance): r for r in rows}


_TABLE_COLUMNS = (("token", 0, "value"), ("hot", 0, "value"), ("token", 0, "chance"), ("depth", 1, "value"), ("depth", 1, "chance"))


def format_table(rows: list[PatternRow], sites: list[Site]) -> str:
    """Per layer and site: cross-window token and hot-set Jaccard with their chance, layer l -> l+1 Jaccard with its chance."""
    table = _lookup(rows)
    header = " ".join(f"{c:>5s}" for c in ("token", "hot", "rand", "l+1", "rand"))
    lines = ["layer " + " | ".join(f"{s.name:^{len(header)}s}" for s in sites), "      " + " | ".join(header for _ in sites)]
    for layer in sorted({layer for s in sites for layer in s.keeps}):
        cells = []
        for s in sites:
            numbers = [getattr(table[key], attr) if (key := (s.name, layer, stat, d)) in table else None
                       for stat, d, attr in _TABLE_COLUMNS]
            cells.append(" ".join("    -" if n is None else f"{n:5.3f}" for n in numbers))
        lines.append(f"{layer:5d} " + " | ".join(cells))
    return "\n".join(lines)


def plot_patterns(rows: list[PatternRow], sites: list[Site], path: Path, title: str) -> None:
    """One row of panels per site: cross-window Jaccard vs layer; layer l -> l+k Jaccard vs l, one line per k; chance dashed."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the object API needs no pyplot backend (Agg writes the PNG)

    table = _lookup(rows)
    distances = sorted({r.distance for r in rows if r.statistic == "depth"})
    colors = colormaps["viridis"].resampled(max(len(distances), 2))(range(len(distances)))
    figure = Figure(figsize=(11, 2.3 * len(sites) + 0.8), layout="constrained")
    axes = figure.subplots(len(sites), 2, squeeze=False, sharex=True)
    for (left, right), site in zip(axes, sites):
        layers = list(site.keeps)
        for statistic, color, label in (("token", "tab:blue", "token pairs"), ("hot", "tab:orange", "window hot sets")):
            points = [table[site.name, layer, statistic, 0] for layer in layers]
            left.plot(layers, [p.value for p in points], color=color, marker=".", label=label)
        left.plot(layers, [table[site.name, layer, "token", 0].chance for layer in layers], "k--", lw=1, label="chance")
        for distance, color in zip(distances, colors):
            points = [table[key] for layer in layers if (key := (site.name, layer, "depth", distance)) in table]
            right.plot([p.layer for p in points], [p.chance for p in points], "k--", lw=1)
            right.plot([p.layer for p in points], [p.value for p in points], color=color, marker=".", label=f"k={distance}")
        left.set_ylabel(f"{site.name}\nJaccard")
        for ax in (left, right):
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
    axes[0, 0].set_title("across inputs: different windows, same layer")
    axes[0, 1].set_title("across depth: layer l predicts layer l+k (same token)")
    axes[0, 0].legend(loc="upper right", fontsize="small", ncols=3)
    axes[0, 1].legend(loc="upper right", fontsize="small", ncols=max(len(distances), 1), title="dashed: chance of each k",
                      title_fontsize="small")
    axes[-1, 0].set_xlabel("layer")
    axes[-1, 1].set_xlabel("layer l")
    figure.suptitle(title)
    figure.savefig(path, dpi=110)
