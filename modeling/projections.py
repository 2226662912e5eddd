"""Which linear layers of a decoder are ActTail's projections: Hugging Face module names -> (layer, kind) and input groups.

Shipped flat inside every exported checkpoint, and the one place the exporter, the studies and the modeling code read a
projection's identity from. Pure Python. Llama, Mistral, Qwen2 and Qwen3 all name their projections this way.
"""

import re

__all__ = [
    "PROJECTION_KINDS",
    "PROJECTION_PATHS",
    "INPUTS",
    "INPUT_OF",
    "SITES",
    "parse_projection",
]

PROJECTION_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
# kind -> module path inside a decoder layer (``model.layers.<i>.<path>``)
PROJECTION_PATHS = {kind: f"{'mlp' if kind in ('gate', 'up', 'down') else 'self_attn'}.{kind}_proj"
                    for kind in PROJECTION_KINDS}
# The distinct input vectors of a decoder layer, in forward order, and the kinds that read each: q/k/v read the normed
# hidden state, o the attention output, gate/up the normed post-attention state, down the MLP's d_ff neurons.
INPUTS = {"attn_in": ("q", "k", "v"), "o_in": ("o",), "mlp_in": ("gate", "up"), "down_in": ("down",)}
INPUT_OF = {kind: name for name, kinds in INPUTS.items() for kind in kinds}
# Which kinds a method sparsifies (the block's ``sites``); the others keep every input. "mlp" is Dhar et al.'s FFN-only.
SITES = {"all": PROJECTION_KINDS, "mlp": INPUTS["mlp_in"] + INPUTS["down_in"]}

_KIND_OF_PATH = {path: kind for kind, path in PROJECTION_PATHS.items()}
_NAME = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(map(re.escape, PROJECTION_PATHS.values())) + r")$")


def parse_projection(name: str) -> tuple[int, str] | None:
    """(layer, kind) of a decoder projection's module name, e.g. ``"model.layers.3.mlp.up_proj"`` -> ``(3, "up")``;
    None for any other name (``lm_head``, embeddings, norms, a q_proj under ``mlp``)."""
    match = _NAME.match(name) if isinstance(name, str) else None
    return (int(match[1]), _KIND_OF_PATH[match[2]]) if match else None
