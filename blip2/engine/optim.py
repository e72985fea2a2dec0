"""AdamW with the BLIP-2 weight-decay groups, and the warm-up + cosine schedule stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import nn


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay for biases, norms and every parameter with fewer than two dimensions (temp included)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float = 0.05,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8) -> torch.optim.AdamW:
    fused = all(p.is_cuda for p in model.parameters() if p.requires_grad) or None
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=tuple(betas), eps=eps,
                             fused=fused)


def warmup_cosine_lr(step: int, learning_rate: float, lr_end: float, warmup_lr_init: float, warmup_steps: int,
                     total_steps: int) -> float:
    """Linear warm-up from warmup_lr_init to learning_rate, then cosine down to lr_end at total_steps."""
    if step < warmup_steps:
        return warmup_lr_init + (learning_rate - warmup_lr_init) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr_end + (learning_rate - lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets every group's lr before each optimizer step; its state is just the step count."""

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
            group["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
