"""LAVIS checkpoints (``blip2_pretrained.pth`` and kin): ``{"model": state_dict}`` or a bare state dict.

A LAVIS file carries no config, so one must be given. LAVIS saves only trainable parameters: with a frozen ViT the
``visual_encoder.*`` tensors are absent and come from ``eva_vit_g.pth`` (``vit_checkpoint``), loaded first and
overridden by whatever the checkpoint does hold, as LAVIS itself does.

Stage-2 ``blip2_opt`` checkpoints hold the Q-Former's query path (LAVIS deletes its text parts) and ``opt_proj`` (our
``llm_proj``), but not the frozen OPT: that comes from the LLM folder in ``text_config.checkpoint_name_or_path``. A
file that does hold it (``opt_model.*``) gives it as ``language_model.*``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from blip2.config import Blip2Config, ConfigError
from blip2.weights import eva
from blip2.weights.keymap import KeyMap, bert_layer, invert, layer_template, rename, weight_and_bias
from blip2.weights.loader import WeightLoadError, read_state_dict

name = "lavis"

_SUFFIXES = (".pth", ".pt", ".bin")
_VISION_PREFIX = "visual_encoder."
_LLM_PREFIX, _OUR_LLM_PREFIX = "opt_model.", "language_model."  # the LLM's own names follow the prefix

LAVIS_TO_NATIVE: KeyMap = {
    **{f"{_VISION_PREFIX}{key}": target for key, target in eva.EVA_TO_NATIVE.items()},
    **weight_and_bias("ln_vision", "ln_vision"),
    "query_tokens": "query_tokens",
    "Qformer.bert.embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "Qformer.bert.embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "Qformer.bert.embeddings.position_ids": None,  # a buffer; the module rebuilds the positions
    **weight_and_bias("Qformer.bert.embeddings.LayerNorm", "qformer.embeddings.layernorm"),
    **bert_layer("Qformer.bert.encoder.layer.{}", attention="self"),
    **weight_and_bias("Qformer.cls.predictions.transform.dense", "lm_head.dense"),
    **weight_and_bias("Qformer.cls.predictions.transform.LayerNorm", "lm_head.norm"),
    "Qformer.cls.predictions.bias": "lm_head.bias",
    # tied: the decoder is the word embeddings, its bias is predictions.bias
    **weight_and_bias("Qformer.cls.predictions.decoder", None),
    **weight_and_bias("vision_proj", "vision_proj"),
    **weight_and_bias("text_proj", "text_proj"),
    **weight_and_bias("itm_head", "itm_head"),
    "temp": "temp",
    **weight_and_bias("opt_proj", "llm_proj"),
}
NATIVE_TO_LAVIS: KeyMap = invert(LAVIS_TO_NATIVE)


def detect(path: Path) -> bool:
    if not (path.is_file() and path.suffix in _SUFFIXES):
        return False
    return any(key.startswith("Qformer.") for key in read_state_dict(path))  # HF files also hold query_tokens


def read_config(path: Path, vit_checkpoint: str | os.PathLike | None = None) -> Blip2Config:
    raise ConfigError(
        f"{path} is a LAVIS checkpoint, which carries no model config: pass config= (a Blip2Config, e.g. "
        "Blip2Config.from_pretrained('blip2_stage1_vit_g')) or, with `blip2 convert`, --config YAML_OR_PRESET"
    )


def read_native_state(
    path: Path, config: Blip2Config, vit_checkpoint: str | os.PathLike | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our-named tensors from the LAVIS file (and ``vit_checkpoint``), plus the keys dropped on purpose."""
    source = read_state_dict(path)
    has_vit = any(key.startswith(_VISION_PREFIX) for key in source)
    if not has_vit and vit_checkpoint is None:
        raise WeightLoadError(
            f"{path} has no visual_encoder.* keys (LAVIS saves only trainable parameters): pass "
            "vit_checkpoint= (the EVA ViT-g file eva_vit_g.pth), or --vit with `blip2 convert`"
        )
    source, dropped = eva.drop_extra_blocks(source, config.vision_config.num_hidden_layers, prefix=_VISION_PREFIX)
    source, llm_state = _split_prefix(source, _LLM_PREFIX)
    state, renamed_dropped = rename(source, LAVIS_TO_NATIVE)
    state |= {_OUR_LLM_PREFIX + key: value for key, value in llm_state.items()}
    dropped += renamed_dropped
    if vit_checkpoint is not None:
        vit_state, vit_dropped = eva.read_vit_state(vit_checkpoint, config)
        state = {**vit_state, **state}
        dropped += vit_dropped
    return eva.fit_pos_embed(state, config), dropped


def _split_prefix(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """(keys without ``prefix``, the keys with it, ``prefix`` removed)."""
    rest = {key: value for key, value in state.items() if not key.startswith(prefix)}
    return rest, {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def to_lavis(native_state: dict[str, torch.Tensor], config: Blip2Config) -> dict[str, torch.Tensor]:
    """Our state dict in LAVIS names, with the tied decoder and the position-id buffer written out as LAVIS has them.

    A stage-2 state gives the ``blip2_opt`` layout: no text parts, ``opt_proj``, and the LLM (if any) as ``opt_model``.
    """
    native_state, llm_state = _split_prefix(native_state, _OUR_LLM_PREFIX)
    state: dict[str, torch.Tensor] = {_LLM_PREFIX + key: value for key, value in llm_state.items()}
    for key, value in native_state.items():
        template, index = layer_template(key)
        if template not in NATIVE_TO_LAVIS:
            raise WeightLoadError(f"{key} has no LAVIS name")
        state[NATIVE_TO_LAVIS[template].format(index)] = value
    if "lm_head.bias" in native_state:  # stage 1: LAVIS writes the decoder tied to the word embeddings out
        state["Qformer.cls.predictions.decoder.weight"] = native_state["qformer.embeddings.word_embeddings.weight"]
        state["Qformer.cls.predictions.decoder.bias"] = native_state["lm_head.bias"]
    positions = config.qformer_config.max_position_embeddings
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)
    return state


def allowed_missing(model) -> list[str]:
    return []


def allowed_unexpected(model) -> list[str]:
    return []
