"""How stage-1 losses see other processes' features, handed in from outside (``engine/distributed.py``).

``nn/`` and ``models/`` never touch ``torch.distributed``: the losses call a ``FeatureGather``. ``LocalGather`` is
the one-process identity.
"""

from __future__ import annotations

from typing import Protocol

import torch


class FeatureGather(Protocol):
    rank: int
    world_size: int

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``tensor`` along dim 0, without gradient (ITC features, text ids)."""

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0; gradients flow back to each process's own slice (ITM image embeddings)."""


class LocalGather:
    """One process: every gather is the identity."""

    rank = 0
    world_size = 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach()  # as across processes: the gathered copy carries no gradient

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


LOCAL = LocalGather()
