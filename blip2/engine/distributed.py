"""Everything that touches torch.distributed: process-group set-up under torchrun, the feature gathers the
stage-1 losses are handed, DDP wrapping, and small collective helpers. One process without torchrun needs none."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip2.models.gather import LOCAL, FeatureGather


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); gloo on CPU, NCCL on GPU."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _pad_dim1(tensor: torch.Tensor, length: int) -> torch.Tensor:
    if tensor.ndim < 2 or tensor.shape[1] == length:
        return tensor
    padding = [0, 0] * (tensor.ndim - 2) + [0, length - tensor.shape[1]]
    return F.pad(tensor, padding)  # zeros: the pad id and "masked" for text ids and masks


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 over ranks; dim 1 (text length) may differ and is zero-padded to the longest."""
    if not is_distributed():
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    if tensor.ndim >= 2:
        length = torch.tensor([tensor.shape[1]], device=tensor.device)
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
        tensor = _pad_dim1(tensor, int(length.item()))
    chunks = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(chunks, tensor)
    return torch.cat(chunks, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        chunks = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(chunks, tensor.contiguous())
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss used every slice: sum the contributions
        return grad.chunk(dist.get_world_size(), dim=0)[dist.get_rank()]


class DistributedGather:
    """The ``FeatureGather`` the stage-1 losses use across processes."""

    def __init__(self) -> None:
        self.rank = rank()
        self.world_size = world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather_no_grad(tensor)

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        return _GatherWithGrad.apply(tensor)


def feature_gather() -> FeatureGather:
    return DistributedGather() if is_distributed() and world_size() > 1 else LOCAL


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP when running distributed (frozen towers hold no gradients, so no unused-parameter search is needed)."""
    if not is_distributed() or world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank; every rank gets the same answer (a collective: all must call it)."""
    if not is_distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj):
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
