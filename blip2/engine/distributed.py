"""Everything that touches torch.distributed: process-group set-up under torchrun, the feature gathers the
stage-1 losses are handed, DDP wrapping, and small collective helpers. One process without torchrun needs none."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip2.models.gather import LOCAL, FeatureGather


def pick_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` -> a device; under torchrun each process takes its LOCAL_RANK's GPU."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda was asked for but no CUDA device is available")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
    timeout = datetime.timedelta(minutes=30)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0:
        dist.init_process_group(backend=backend, timeout=timeout)
        return True
    # an elastic restart: torchrun's store still holds the dead attempt's addresses under the same keys, so this
    # attempt's process group keeps its keys apart
    store, rank_, size = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"blip2_attempt_{attempt}", store), rank=rank_,
                            world_size=size, timeout=timeout)
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


def data_parallel_mesh(parallel_config=None, device: torch.device | None = None):
    """The 1-D data-parallel device mesh (``parallel.data_parallel`` x ``parallel.model_parallel`` = world size);
    None in one process. A config that disagrees with the launch is one line (``ConfigError``)."""
    size = world_size()
    if parallel_config is not None:
        size = parallel_config.data_parallel_size(size)
    if not is_distributed():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device_type = device.type if device is not None else "cpu"
    return init_device_mesh(device_type, (size,), mesh_dim_names=("dp",))


def llm_blocks(language_model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM: the ModuleList as long as ``config.num_hidden_layers``."""
    count = getattr(getattr(language_model, "config", None), "num_hidden_layers", None)
    for module in language_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return list(module)
    return []


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "blip2_checkpointed", False):
            continue
        forward = block.forward

        def checkpointed(*args, forward=forward, **kwargs):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed
        block.blip2_checkpointed = True


def wrap_model(model: nn.Module, device: torch.device, parallel_config=None) -> nn.Module:
    """DDP when running distributed (frozen towers hold no gradients, so no unused-parameter search is needed), or
    FSDP2 (``fully_shard``) with ``parallel.strategy: fsdp``; activation checkpointing on the LLM blocks if asked."""
    mesh = data_parallel_mesh(parallel_config, device)
    llm = getattr(model, "language_model", None)
    if parallel_config is not None and parallel_config.activation_checkpointing and llm is not None:
        checkpoint_activations(llm_blocks(llm))
    if mesh is None or world_size() == 1:
        return model
    if parallel_config is not None and parallel_config.strategy == "fsdp":
        return shard_model(model, mesh, shard_llm=parallel_config.llm == "shard")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def shard_model(model: nn.Module, mesh, shard_llm: bool) -> nn.Module:
    """FSDP2: each LLM block and the LLM sharded on their own (``shard_llm``) or the LLM left whole on every process,
    then the root (Q-Former, projection, query tokens, frozen vision tower): its gradients are reduce-scattered and
    averaged over the mesh, as DDP averages them."""
    from torch.distributed.fsdp import fully_shard

    scalars = [name for name, param in model.named_parameters() if param.ndim == 0]
    if scalars:  # stage 1's contrastive temperature: FSDP2 shards along dim 0, which a scalar lacks
        raise ValueError(f"parallel.strategy: fsdp cannot shard {type(model).__name__}: it holds scalar parameters "
                         f"({', '.join(scalars)}); use strategy: ddp for it (fsdp is for stage 2)")
    llm = getattr(model, "language_model", None)
    ignored = None
    if llm is not None and shard_llm:
        for block in llm_blocks(llm):
            fully_shard(block, mesh=mesh)
        embeddings, head = llm.get_input_embeddings(), llm.get_output_embeddings()
        tied = head is not None and head.weight is embeddings.weight  # one group for a tied pair
        # its own group: the model embeds the caption outside llm.forward
        fully_shard([embeddings, head] if tied else embeddings, mesh=mesh)
        fully_shard(llm, mesh=mesh)
    elif llm is not None:
        ignored = set(llm.parameters())
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    return model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was wrapped by FSDP2 (its state dict holds DTensor shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The model DDP wraps; an FSDP2 model is its own (sharded in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors, on the CPU: a collective under FSDP2 (every rank calls it; rank 0 gets them all,
    the others an empty dict); the plain state dict otherwise."""
    if not is_sharded(model):
        return {key: value.detach().cpu() for key, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside the block ``model`` holds its whole weights as plain tensors (FSDP2: on rank 0 only; a collective that
    every rank enters), so ``save_pretrained`` writes a plain folder; the shards are put back after it."""
    if not is_sharded(model):
        yield model
        return
    state = full_state_dict(model)
    swapped = []
    if state:  # by identity, so tied weights stay tied
        whole = {id(param): nn.Parameter(state[name], requires_grad=param.requires_grad)
                 for name, param in model.named_parameters()}
        for owner in model.modules():
            for leaf, param in list(owner._parameters.items()):
                if param is not None and id(param) in whole:
                    swapped.append((owner, leaf, param))
                    owner._parameters[leaf] = whole[id(param)]
    try:
        yield model
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


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


def all_gather_varlen(tensor: torch.Tensor | None) -> torch.Tensor:
    """Concatenate along dim 0 over ranks, in rank order, when ranks hold different numbers of rows; None stands for
    no rows (its other dims and dtype are taken from a rank that has some). Rows are padded to the longest share
    for the gather and the padding is dropped again, so the result holds exactly the ranks' rows."""
    if not is_distributed() or world_size() == 1:
        if tensor is None:
            raise ValueError("nothing to gather: no process holds any rows")
        return tensor.detach()
    shape = None if tensor is None else (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    shapes = all_gather_objects(shape)
    known = [s for s in shapes if s is not None]
    if not known:
        raise ValueError("nothing to gather: no process holds any rows")
    trailing, dtype = known[0][0][1:], getattr(torch, known[0][1])
    sizes = [s[0][0] if s is not None else 0 for s in shapes]
    device = tensor.device if tensor is not None else (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
    padded = torch.zeros((max(sizes), *trailing), dtype=dtype, device=device)
    if tensor is not None:
        padded[: tensor.shape[0]] = tensor.detach()
    chunks = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(chunks, padded)
    return torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes)], dim=0)
