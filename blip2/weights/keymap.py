"""Key maps: foreign checkpoint names to ours, ``{}`` standing for a layer index, None for keys dropped on purpose.

Maps are plain dicts (STYLE rule 8). ``rename`` applies one; ``invert`` turns it around for writing foreign formats.
"""

from __future__ import annotations

import re
from typing import TypeVar

from blip2.weights.loader import WeightLoadError

KeyMap = dict[str, str | None]
V = TypeVar("V")

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def layer_template(key: str) -> tuple[str, str | None]:
    """``a.3.b`` -> (``a.{}.b``, ``"3"``); a key without a layer index comes back unchanged with None."""
    match = _LAYER_INDEX.search(key)
    if match is None:
        return key, None
    return f"{key[: match.start()]}.{{}}.{key[match.end():]}", match.group(1)


def rename(state: dict[str, V], key_map: KeyMap) -> tuple[dict[str, V], list[str]]:
    """Translate the keys of ``state``; returns (translated state, source keys dropped on purpose).

    A key the map does not know keeps its name, so the strict load names it as unexpected.
    """
    out: dict[str, V] = {}
    dropped: list[str] = []
    for key, value in state.items():
        template, index = layer_template(key)
        if template not in key_map:
            target = key
        elif key_map[template] is None:
            dropped.append(key)
            continue
        else:
            target = key_map[template].format(index)
        if target in out:
            raise WeightLoadError(f"two checkpoint keys map to {target}; the second is {key}")
        out[target] = value
    return out, dropped


def invert(key_map: KeyMap) -> KeyMap:
    """Ours -> foreign, leaving out the keys the foreign format drops."""
    inverse: KeyMap = {}
    for foreign, ours in key_map.items():
        if ours is None:
            continue
        if ours in inverse:
            raise ValueError(f"key map is not one-to-one: {inverse[ours]} and {foreign} both map to {ours}")
        inverse[ours] = foreign
    return inverse


def weight_and_bias(source: str, target: str | None) -> KeyMap:
    """The ``.weight`` and ``.bias`` entries of one Linear or LayerNorm (target None: drop both)."""
    return {f"{source}.{name}": None if target is None else f"{target}.{name}" for name in ("weight", "bias")}


def bert_layer(source: str, attention: str, target: str = "qformer.layers.{}") -> KeyMap:
    """One Q-Former layer in BERT's naming: self-attention, cross-attention, text FFN and query FFN.

    ``attention`` names the projections' parent: ``"self"`` in BERT and LAVIS, ``"attention"`` in transformers'
    BLIP-2. Only layers with cross-attention have ``crossattention.*`` keys; the map covers every layer.
    """
    out: KeyMap = {}
    for block, ours in (("attention", "self_attn"), ("crossattention", "cross_attn")):
        for projection, our_projection in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            out |= weight_and_bias(
                f"{source}.{block}.{attention}.{projection}", f"{target}.{ours}.attn.{our_projection}"
            )
        out |= weight_and_bias(f"{source}.{block}.output.dense", f"{target}.{ours}.attn.out_proj")
        out |= weight_and_bias(f"{source}.{block}.output.LayerNorm", f"{target}.{ours}.norm")
    for suffix, ours in (("", "text_ffn"), ("_query", "query_ffn")):
        out |= weight_and_bias(f"{source}.intermediate{suffix}.dense", f"{target}.{ours}.intermediate")
        out |= weight_and_bias(f"{source}.output{suffix}.dense", f"{target}.{ours}.output.dense")
        out |= weight_and_bias(f"{source}.output{suffix}.LayerNorm", f"{target}.{ours}.output.norm")
    return out
