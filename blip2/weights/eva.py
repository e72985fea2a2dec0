"""EVA-CLIP ViT-g weights (``eva_vit_g.pth``): the frozen image encoder of every LAVIS BLIP-2 model.

The file holds the 40-block EVA-CLIP-g; BLIP-2 uses the first ``num_hidden_layers`` (39) blocks and no final norm or
head, so the rest is dropped and reported. A position table for another image size is resized at load time.
"""

from __future__ import annotations

import logging
import os

import torch

from blip2.config import Blip2Config
from blip2.nn.vit import interpolate_pos_embed
from blip2.weights.keymap import KeyMap, layer_template, rename, weight_and_bias
from blip2.weights.loader import read_state_dict

logger = logging.getLogger(__name__)

EVA_TO_NATIVE: KeyMap = {
    "cls_token": "vision_model.cls_token",
    "pos_embed": "vision_model.pos_embed",
    **weight_and_bias("patch_embed.proj", "vision_model.patch_embed"),
    **weight_and_bias("blocks.{}.norm1", "vision_model.blocks.{}.norm1"),
    "blocks.{}.attn.qkv.weight": "vision_model.blocks.{}.attn.qkv.weight",
    "blocks.{}.attn.q_bias": "vision_model.blocks.{}.attn.q_bias",
    "blocks.{}.attn.v_bias": "vision_model.blocks.{}.attn.v_bias",
    **weight_and_bias("blocks.{}.attn.proj", "vision_model.blocks.{}.attn.out_proj"),
    **weight_and_bias("blocks.{}.norm2", "vision_model.blocks.{}.norm2"),
    **weight_and_bias("blocks.{}.mlp.fc1", "vision_model.blocks.{}.mlp.fc1"),
    **weight_and_bias("blocks.{}.mlp.fc2", "vision_model.blocks.{}.mlp.fc2"),
    # EVA-CLIP's own pooling and classifier: BLIP-2 reads the tokens before them
    **weight_and_bias("norm", None),
    **weight_and_bias("fc_norm", None),
    **weight_and_bias("head", None),
}


def drop_extra_blocks(
    state: dict[str, torch.Tensor], num_layers: int, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split off ``{prefix}blocks.N.*`` for N >= ``num_layers`` (BLIP-2 drops EVA-CLIP-g's last block)."""
    kept, dropped = {}, []
    for key, value in state.items():
        template, index = layer_template(key)
        if template.startswith(f"{prefix}blocks.{{}}.") and int(index) >= num_layers:
            dropped.append(key)
        else:
            kept[key] = value
    return kept, dropped


def fit_pos_embed(state: dict[str, torch.Tensor], config: Blip2Config) -> dict[str, torch.Tensor]:
    """Resize ``vision_model.pos_embed`` to the configured image size (bicubic, CLS kept), as LAVIS does on load."""
    pos_embed = state.get("vision_model.pos_embed")
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    if pos_embed is not None and pos_embed.shape[1] != grid * grid + 1:
        logger.info("resizing the ViT position table from %d positions to %dx%d + 1", pos_embed.shape[1], grid, grid)
        state = {**state, "vision_model.pos_embed": interpolate_pos_embed(pos_embed, (grid, grid))}
    return state


def read_vit_state(path: str | os.PathLike, config: Blip2Config) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ``eva_vit_g.pth`` as ``vision_model.*`` tensors, plus the file's keys dropped on purpose."""
    source, extra_blocks = drop_extra_blocks(read_state_dict(path), config.vision_config.num_hidden_layers)
    state, dropped = rename(source, EVA_TO_NATIVE)
    return fit_pos_embed(state, config), extra_blocks + dropped
