"""AdamW with the BLIP-2 weight-decay groups, and the warm-up + cosine schedule stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn


VISION_PREFIX = "vision_model."  # the image encoder's parameters (a trainable ViT: retrieval fine-tuning)
VISION_BLOCKS = "vision_model.blocks."  # block i's parameters: VISION_BLOCKS + f"{i}."
VISION_EMBEDDINGS = tuple(VISION_PREFIX + name for name in ("cls_token", "pos_embed", "patch_embed."))


def vision_layer_id(name: str, num_layers: int) -> int:
    """LAVIS ``get_num_layer`` on our names: embeddings 0, block i -> i + 1, the rest of the ViT num_layers + 1."""
    if name.startswith(VISION_BLOCKS):
        return int(name[len(VISION_BLOCKS):].split(".", 1)[0]) + 1
    if name.startswith(VISION_EMBEDDINGS):
        return 0
    return num_layers + 1


def lr_scale_of(name: str, num_layers: int, vision_lr_scale: float, layer_decay: float) -> float:
    """The learning-rate multiplier of a parameter: 1 outside the ViT; in it ``vision_lr_scale`` times
    ``layer_decay ** (num_layers + 1 - layer_id)`` (the paper's layer-wise decay: the top block learns fastest)."""
    if not name.startswith(VISION_PREFIX):
        return 1.0
    return vision_lr_scale * layer_decay ** (num_layers + 1 - vision_layer_id(name, num_layers))


def parameter_groups(model: nn.Module, weight_decay: float, vision_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict]:
    """No weight decay for biases, norms and every parameter with fewer than two dimensions (temp included); a
    trainable ViT's parameters get ``lr_scale`` (see ``lr_scale_of``), one group per (decay, scale). The first group
    is always the unscaled one with weight decay."""
    num_layers = sum(1 for name in {n[len(VISION_BLOCKS):].split(".", 1)[0] for n, _ in model.named_parameters()
                                    if n.startswith(VISION_BLOCKS)})
    groups: dict[tuple[float, float], list] = {(weight_decay, 1.0): [], (0.0, 1.0): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or name.endswith(".bias") else weight_decay
        scale = lr_scale_of(name, num_layers, vision_lr_scale, layer_decay)
        groups.setdefault((decay, scale), []).append(param)
    return [{"params": params, "weight_decay": decay, "lr_scale": scale}
            for (decay, scale), params in groups.items() if params or scale == 1.0]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8, vision_lr_scale: float = 1.0,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters() if p.requires_grad) or None
    groups = parameter_groups(model, weight_decay, vision_lr_scale, layer_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas), eps=eps, fused=fused)


def warmup_cosine_lr(step: int, learning_rate: float, lr_end: float, warmup_lr_init: float, warmup_steps: int,
                     total_steps: int) -> float:
    """Linear warm-up from warmup_lr_init to learning_rate, then cosine down to lr_end at total_steps."""
    if step < warmup_steps:
        return warmup_lr_init + (learning_rate - warmup_lr_init) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_end + (learning_rate - lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's lr (times its ``lr_scale``, 1 by default) before each optimizer step; its state is just the
    step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, learning_rate: float, lr_end: float, warmup_lr_init: float,
                 warmup_steps: int, total_steps: int) -> None:
        self.optimizer = optimizer
        self.args = dict(learning_rate=learning_rate, lr_end=lr_end, warmup_lr_init=warmup_lr_init,
                         warmup_steps=warmup_steps, total_steps=total_steps)
        self.step_count = 0
        self._apply()

    def _apply(self) -> None:
        lr = warmup_cosine_lr(self.step_count, **self.args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        """The schedule's lr (the unscaled groups')."""
        return warmup_cosine_lr(self.step_count, **self.args)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
