"""Training checkpoints: everything needed to continue exactly, written atomically, read without running code.

A checkpoint is a folder ``<output_dir>/checkpoints/step_XXXXXXXX/`` holding the unwrapped model
(``model/``: ``model.safetensors`` + ``config.yaml``), ``trainer_state.pt`` (optimizer, schedule, grad scaler, step,
epoch, position in the epoch) and one ``rng_rank{r}.pt`` per process. It is written under a temporary name and renamed
when complete, so a crash never leaves a folder that looks finished. The ``.pt`` files hold only tensors and plain
Python values and are read with ``weights_only=True``: a crafted file cannot run code on ``--resume``.

Under ``parallel.strategy: fsdp`` the model and the optimizer go instead to ``dcp/``, written by every rank through
``torch.distributed.checkpoint`` (its own format, no pickled code): a run on another number of processes loads it.
"""

from __future__ import annotations

import errno
import logging
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from blip2.engine import distributed
from blip2.weights import load_into, read_state_dict
from blip2.weights.loader import WEIGHTS_NAME, save_pretrained

logger = logging.getLogger("blip2")

_STEP_DIR = re.compile(r"^step_(\d+)$")
_STAGING_DIR = re.compile(r"^\.tmp_step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"
DCP_DIR = "dcp"  # torch.distributed.checkpoint's folder: model + optimizer, sharded (parallel.strategy: fsdp)
_NEARLY_FULL = 2**20  # bytes: a write that failed with less than this left was stopped by a full disk
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written; the message names the file or folder and the reason, in one line."""


def rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from, as tensors and plain values (``weights_only``-safe)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _STEP_DIR.match(path.name)
             and (path / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_run_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the checkpoint folders a run of ours wrote (complete ``step_N/`` and left-over ``.tmp_step_N/``);
    anything else under ``checkpoints/`` stays. Returns what was removed."""
    root = Path(output_dir) / "checkpoints"
    removed = list_checkpoints(output_dir)
    if root.is_dir():
        removed += [path for path in root.iterdir() if path.is_dir() and _STAGING_DIR.match(path.name)]
    for path in removed:
        shutil.rmtree(path)
    return removed


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True when every floating-point value is finite (one device-to-host read)."""
    checks = [tensor.detach().isfinite().all() for tensor in tensors if tensor.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


def _checkpoint_bytes(model: torch.nn.Module, trainer_state: dict[str, Any]) -> int:
    """About what a checkpoint takes on disk: the model's tensors plus the optimizer's."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for per_param in trainer_state.get("optimizer", {}).get("state", {}).values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if isinstance(v, torch.Tensor))
    return total


def _write_error(folder: Path, error: BaseException, needed: int) -> CheckpointError:
    """One line for a failed write; 'no space left' when the disk says so (torch's own message does not)."""
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error) or (
        free is not None and free < max(needed, _NEARLY_FULL))
    if full:
        shown = f" ({free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed)" if free is not None else ""
        return CheckpointError(f"could not write checkpoint {folder}: no space left on device{shown}; earlier "
                               "checkpoints are intact")
    reason = " ".join(str(error).split()) or type(error).__name__
    return CheckpointError(f"could not write checkpoint {folder}: {reason}; earlier checkpoints are intact")


class TransformersConfig:
    """A plain transformers model's config where a checkpoint keeps its config (JSON, which YAML reads too)."""

    def __init__(self, config) -> None:
        self.config = config

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.config.to_json_string(), encoding="utf-8")


def checkpoint_config(model: torch.nn.Module):
    """What writes the checkpoint's config.yaml: the model's own config, or a transformers config's JSON."""
    config = model.config
    return config if hasattr(config, "to_yaml") else TransformersConfig(config)


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    save_total_limit: int = 0, rng: dict[str, Any] | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Every rank writes its RNG state (``rng``, default: the current one); rank 0 writes the rest and publishes the
    folder by renaming it. A failed write on any rank removes the staging folder and raises ``CheckpointError``
    on every rank (no rank is left waiting). With ``optimizer`` (``parallel.strategy: fsdp``) the model and the
    optimizer go to ``dcp/`` through ``torch.distributed.checkpoint``, every rank writing its shards, instead of
    ``model/`` and the trainer state's ``optimizer``; any world size can load them."""
    final = checkpoint_dir(output_dir, step)
    staging = final.with_name(f".tmp_{final.name}")
    needed = _checkpoint_bytes(model, trainer_state) if distributed.is_main_process() else 0
    error: BaseException | None = None
    if distributed.is_main_process():
        try:
            if final.exists() and not (final / TRAINER_STATE).is_file():
                raise CheckpointError(f"{final} exists but is not a blip2 checkpoint: refusing to replace it")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            free = shutil.disk_usage(staging).free
            if free < needed:
                raise OSError(errno.ENOSPC, "No space left on device")
        except (OSError, CheckpointError) as err:
            error = err
    if distributed.all_true(error is None):
        try:
            torch.save(rng if rng is not None else rng_state(), staging / f"rng_rank{distributed.rank()}.pt")
        except (OSError, RuntimeError) as err:
            error = err
        if optimizer is not None and distributed.all_true(error is None):
            try:
                save_sharded(staging / DCP_DIR, model, optimizer)
            except Exception as err:  # noqa: BLE001 -- DCP wraps every rank's failure in its own type
                error = err
        if distributed.all_true(error is None) and distributed.is_main_process():
            try:
                if optimizer is None:
                    save_pretrained(model, staging / "model", config=checkpoint_config(model))
                torch.save(trainer_state, staging / TRAINER_STATE)
                shutil.rmtree(final, ignore_errors=True)
                staging.rename(final)
            except Exception as err:  # noqa: BLE001 -- safetensors raises its own type for a full disk
                error = err
    if not distributed.all_true(error is None):
        failure = (_write_error(staging, error, needed) if error is not None else
                   CheckpointError(f"could not write checkpoint {final}: another process failed to write its part"))
        if distributed.is_main_process():
            shutil.rmtree(staging, ignore_errors=True)
        raise failure
    if distributed.is_main_process() and save_total_limit > 0:
        for old in list_checkpoints(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state through DCP (a collective: every rank writes its shards, rank 0 the metadata)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a DCP folder into ``model`` and ``optimizer`` whatever the world size that wrote it (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as error:  # noqa: BLE001 -- DCP raises its own types for a missing or mismatched tensor
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise CheckpointError(f"{folder}: cannot load the sharded checkpoint ({reason})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_plain(path: Path) -> Any:
    """A ``.pt`` file of tensors and plain values; anything that would need code to rebuild is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNSUPPORTED_GLOBAL.search(str(error))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values{what}; refusing to "
                              "unpickle it, since that could run code (was it written by blip2?)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise CheckpointError(f"{path}: unreadable or truncated ({reason})") from None


def weights_are_finite(path: str | Path) -> bool:
    """Whether a checkpoint's model weights are all finite (checked before resuming from it). A DCP checkpoint
    counts as finite: its trainable weights were checked before it was written."""
    if (Path(path) / DCP_DIR).is_dir():
        return True
    return all_finite(read_state_dict(Path(path) / "model" / WEIGHTS_NAME).values())


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load the model weights and this rank's RNG state; return the trainer state for the caller to apply. A DCP
    checkpoint (``dcp/``) also loads ``optimizer``; a rank with no RNG file of its own (a larger world size than the
    one that saved) keeps its current RNG state."""
    path = Path(path)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {TRAINER_STATE})")
    trainer_state = _load_plain(path / TRAINER_STATE)
    if not isinstance(trainer_state, dict) or "step" not in trainer_state:
        raise CheckpointError(f"{path / TRAINER_STATE}: not a blip2 trainer state (no 'step')")
    rng_file = path / f"rng_rank{distributed.rank()}.pt"
    rng = _load_plain(rng_file) if rng_file.is_file() else None
    if (path / DCP_DIR).is_dir():
        if optimizer is None:
            raise CheckpointError(f"{path}: a sharded (DCP) checkpoint; loading it needs the optimizer")
        load_sharded(path / DCP_DIR, model, optimizer)
    else:
        load_into(model, read_state_dict(path / "model" / WEIGHTS_NAME), source=str(path))
    if rng is not None:
        trainer_state["rng"] = rng
    return trainer_state


def resumable_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``output_dir`` whose weights are finite; newer ones that hold NaN or inf are skipped
    with a warning (a run saved by an older version may have saved them just before its loss went non-finite)."""
    for path in reversed(list_checkpoints(output_dir)):
        if weights_are_finite(path):
            return path
        logger.warning("skipping checkpoint %s: its weights are not finite (NaN or inf)", path)
    return None
