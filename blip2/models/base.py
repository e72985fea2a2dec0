"""What both BLIP-2 models share: presets, loading and saving, and keeping frozen towers frozen."""

from __future__ import annotations

import os

import torch
from torch import nn

from blip2.config import Blip2Config


class Blip2PreTrainedModel(nn.Module):
    """Base class: ``from_pretrained`` / ``save_pretrained`` / ``show_support_list`` and the freezing policy."""

    # the registry group this class's presets belong to ("stage1" or "stage2")
    preset_group: str = ""

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config

    # --- presets and weights -------------------------------------------------------------------------------------
    @classmethod
    def show_support_list(cls) -> list[str]:
        """Print and return the preset names this class can be built from."""
        from blip2 import registry

        names = registry.names(cls.preset_group)
        print(f"{cls.__name__} supports: {names}")
        return names

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, config: Blip2Config | None = None, **kwargs):
        """Build from a preset name, one of our folders, a Hugging Face BLIP-2 folder or a LAVIS ``.pth``."""
        from blip2.weights import load_pretrained

        return load_pretrained(cls, name_or_path, config=config, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.yaml`` and ``model.safetensors`` to ``directory``."""
        from blip2.weights import save_pretrained

        save_pretrained(self, directory)

    # --- freezing ------------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Sub-modules that stay in eval mode with no gradients (overridden by each model)."""
        return []

    def apply_freezing(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # a frozen tower never runs dropout or updates statistics
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
