"""Typed outputs of the BLIP-2 models. Shapes: B batch, Q queries, L text length, D width, E embedding."""

from __future__ import annotations

from dataclasses import astuple, dataclass

import torch


@dataclass
class Blip2Output:
    """Stage-1 training output: the total loss and its three parts (all scalars)."""

    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_lm: torch.Tensor

    def to_tuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.loss, self.loss_itc, self.loss_itm, self.loss_lm)


@dataclass
class Blip2FeatureOutput:
    """``extract_features``: what each mode computes; fields of other modes stay None."""

    image_embeds: torch.Tensor | None = None  # (B, Q, D) query outputs
    image_embeds_proj: torch.Tensor | None = None  # (B, Q, E) normalized
    text_embeds: torch.Tensor | None = None  # (B, L, D)
    text_embeds_proj: torch.Tensor | None = None  # (B, L, E) normalized; [:, 0] is the retrieval vector
    multimodal_embeds: torch.Tensor | None = None  # (B, Q, D) query outputs of the joint image-text pass

    def to_tuple(self) -> tuple:
        return astuple(self)


@dataclass
class Blip2Stage2Output:
    """Stage-2 output: the language-modelling loss (None without text targets) and the LLM's logits."""

    loss: torch.Tensor | None  # scalar, mean over the caption tokens that are targets
    logits: torch.Tensor  # (B, Q + L, V): one row per LLM input position, queries first

    def to_tuple(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        return (self.loss, self.logits)
