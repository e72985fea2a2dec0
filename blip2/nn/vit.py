"""EVA ViT image encoder (pre-norm transformer, learned absolute positions, no final norm, no head)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2.config import ViTConfig
from blip2.nn.attention import Attention


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize the patch part of ``pos_embed`` (1, 1 + g*g, D) to ``grid_size``; the CLS slot is kept."""
    num_patches = pos_embed.shape[1] - 1
    old_grid = int(math.isqrt(num_patches))
    if old_grid * old_grid != num_patches:
        raise ValueError(f"position embedding of {num_patches} patches is not a square grid")
    if (old_grid, old_grid) == tuple(grid_size):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    patch_pos = patch_pos.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid_size), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


def sincos_position_embedding(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sine-cosine table (grid * grid, dim), rows in raster order: half the channels encode the row,
    half the column, each as sines and cosines at ``dim / 4`` geometric frequencies."""
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coordinate in (rows.reshape(-1), cols.reshape(-1)):
        angles = coordinate[:, None] * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1])).float()  # dim not a multiple of 4: zeros


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.rate
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
        return hidden_states * mask / keep


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))  # exact GELU, as EVA


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: ViTConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config.hidden_size, config.num_attention_heads, fused_qkv=True, qkv_bias=config.qkv_bias)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_out, _ = self.attn(self.norm1(hidden_states))
        hidden_states = hidden_states + self.drop_path(attn_out)
        return hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))


class VisionTransformer(nn.Module):
    """pixel_values (B, 3, H, W) -> all tokens of the last block, CLS first: (B, 1 + H/p * W/p, D)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        last = max(1, config.num_hidden_layers - 1)
        rates = [config.drop_path_rate * index / last for index in range(config.num_hidden_layers)]  # linear decay
        self.blocks = nn.ModuleList(VisionBlock(config, rate) for rate in rates)
        self._init_weights()

    def _init_weights(self) -> None:
        # fixed 2-D sine-cosine positions (MAE) rather than trunc_normal(0.02), so a frozen random encoder still
        # tells patches apart by position (scaled by ViTConfig.position_init_amplitude); pretrained weights replace it
        grid = self.config.image_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed.zero_()
            table = sincos_position_embedding(self.config.hidden_size, grid)
            self.pos_embed[0, 1:] = self.config.position_init_amplitude * table
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """``interpolate_pos_encoding=True`` reads images of another size: the patch positions are resized
        bicubically to the image's grid (as transformers' BLIP-2 does); without it the size must be the model's."""
        height, width = pixel_values.shape[-2:]
        patch, size = self.config.patch_size, self.config.image_size
        if not interpolate_pos_encoding and (height, width) != (size, size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model ({size}*{size}): resize the "
                             f"images to {size} (the model's image processor does) or pass "
                             "interpolate_pos_encoding=True")
        if height % patch or width % patch:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
        weight = self.patch_embed.weight
        patches = self.patch_embed(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.to(patches.dtype).expand(patches.shape[0], -1, -1)
        pos_embed = interpolate_pos_embed(self.pos_embed, (height // patch, width // patch))
        hidden_states = torch.cat((cls, patches), dim=1) + pos_embed.to(patches.dtype)  # (B, 1 + N, D)
        use_checkpoint = self.config.use_grad_checkpoint and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_checkpoint:
                hidden_states = checkpoint(block, hidden_states, use_reentrant=False)
            else:
                hidden_states = block(hidden_states)
        return hidden_states
