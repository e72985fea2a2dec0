"""Hugging Face transformers BLIP-2 folders: ``config.json`` + ``model.safetensors`` (or shards, or ``.bin`` files).

``Blip2ForImageTextRetrieval`` folders hold the whole stage-1 model except ``temp`` and the Q-Former LM head.
``Blip2ForConditionalGeneration`` folders hold the ViT, the Q-Former's query path, ``language_projection`` (our
``llm_proj``) and the LLM (``language_model.*``, whose names are the LLM's own and stay as they are): the whole stage-2
model. Loaded into the stage-1 model, the projection and the LLM are reported as unused and the text-only parts keep
their initial values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from blip2.config import Blip2Config, config_from_hf_folder
from blip2.weights import eva
from blip2.weights.keymap import KeyMap, bert_layer, invert, rename, weight_and_bias
from blip2.weights.loader import read_state_dict

logger = logging.getLogger(__name__)

name = "hf"

_HF_VIT = "vision_model.encoder.layers.{}"
_OUR_VIT = "vision_model.blocks.{}"

HF_TO_NATIVE: KeyMap = {
    "vision_model.embeddings.class_embedding": "vision_model.cls_token",
    "vision_model.embeddings.position_embedding": "vision_model.pos_embed",
    **weight_and_bias("vision_model.embeddings.patch_embedding", "vision_model.patch_embed"),
    **weight_and_bias(f"{_HF_VIT}.layer_norm1", f"{_OUR_VIT}.norm1"),
    f"{_HF_VIT}.self_attn.qkv.weight": f"{_OUR_VIT}.attn.qkv.weight",
    # the fused qkv.bias is split into these first (older Hub revisions store them as they are)
    f"{_HF_VIT}.self_attn.q_bias": f"{_OUR_VIT}.attn.q_bias",
    f"{_HF_VIT}.self_attn.v_bias": f"{_OUR_VIT}.attn.v_bias",
    **weight_and_bias(f"{_HF_VIT}.self_attn.projection", f"{_OUR_VIT}.attn.out_proj"),
    **weight_and_bias(f"{_HF_VIT}.layer_norm2", f"{_OUR_VIT}.norm2"),
    **weight_and_bias(f"{_HF_VIT}.mlp.fc1", f"{_OUR_VIT}.mlp.fc1"),
    **weight_and_bias(f"{_HF_VIT}.mlp.fc2", f"{_OUR_VIT}.mlp.fc2"),
    **weight_and_bias("vision_model.post_layernorm", "ln_vision"),
    "query_tokens": "query_tokens",
    "embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "embeddings.position_ids": None,  # a buffer (persistent in old transformers versions)
    **weight_and_bias("qformer.layernorm", "qformer.embeddings.layernorm"),
    **bert_layer("qformer.encoder.layer.{}", attention="attention"),
    **weight_and_bias("vision_projection", "vision_proj"),
    **weight_and_bias("text_projection", "text_proj"),
    **weight_and_bias("itm_head", "itm_head"),
    **weight_and_bias("language_projection", "llm_proj"),
}
NATIVE_TO_HF: KeyMap = {
    **invert(HF_TO_NATIVE),
    "temp": None,  # transformers has no learned temperature
    **weight_and_bias("lm_head.dense", None),  # nor the Q-Former LM head
    **weight_and_bias("lm_head.norm", None),
    "lm_head.bias": None,
}

# in the stage-1 model but not in a generation checkpoint (its Q-Former reads no text)
TEXT_ONLY = [
    "qformer.embeddings.word_embeddings.weight", "qformer.embeddings.position_embeddings.weight",
    "qformer.layers.*.text_ffn.*", "lm_head.*", "vision_proj.*", "text_proj.*", "itm_head.*", "temp",
]


def detect(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "blip-2"


# --- config --------------------------------------------------------------------------------------------------------
def read_config(path: Path) -> Blip2Config:
    return config_from_hf_folder(path)


# --- weights -------------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"]
            return [path / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(
        f"{path} has config.json but no weights: expected model.safetensors, model.safetensors.index.json + shards, "
        "pytorch_model.bin or pytorch_model.bin.index.json + shards"
    )


def _split_qkv_bias(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers fuses the ViT bias as [q | k | v]; EVA has no k bias, so keep q and v only."""
    out = {}
    for key, value in state.items():
        if not key.endswith(".self_attn.qkv.bias"):
            out[key] = value
            continue
        q_bias, k_bias, v_bias = value.chunk(3)
        if torch.count_nonzero(k_bias):
            logger.warning("%s: the key slice of the bias is not zero; dropped (EVA keeps the k bias at zero)", key)
        stem = key[: -len("qkv.bias")]
        out[f"{stem}q_bias"], out[f"{stem}v_bias"] = q_bias, v_bias
    return out


def read_native_state(path: Path, config: Blip2Config) -> tuple[dict[str, torch.Tensor], list[str]]:
    source: dict[str, torch.Tensor] = {}
    for file in _weight_files(path):
        source.update(read_state_dict(file))
    return to_native(source, config)


def to_native(state: dict[str, torch.Tensor], config: Blip2Config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A transformers BLIP-2 state dict (e.g. a model's ``state_dict()`` in memory) in our names, and the keys
    dropped on purpose."""
    native, dropped = rename(_split_qkv_bias(state), HF_TO_NATIVE)
    return eva.fit_pos_embed(native, config), dropped


def to_hf(native_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in the names of ``transformers.Blip2ForImageTextRetrieval`` (no ``temp``, no LM head)."""
    state, _ = rename(native_state, NATIVE_TO_HF)
    for key in [key for key in state if key.endswith(".self_attn.q_bias")]:
        stem = key[: -len("q_bias")]
        q_bias, v_bias = state.pop(key), state.pop(f"{stem}v_bias")
        state[f"{stem}qkv.bias"] = torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))
    return state


def allowed_missing(model) -> list[str]:
    """``temp`` and the LM head are never in a transformers file; the text parts only in retrieval ones."""
    if model.config.text_config is not None:
        return TEXT_ONLY
    return ["temp", "lm_head.*"]


def allowed_unexpected(model) -> list[str]:
    return ["language_model.*", "llm_proj.*"]  # a generation folder read into the stage-1 model
