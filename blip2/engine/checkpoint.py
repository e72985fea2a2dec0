"""Training checkpoints: everything needed to continue exactly, written atomically.

A checkpoint is a folder ``<output_dir>/checkpoints/step_XXXXXXXX/`` holding the unwrapped model
(``model.safetensors`` + ``config.yaml``), ``trainer_state.pt`` (optimizer, schedule, grad scaler, step, epoch,
position in the epoch) and one ``rng_rank{r}.pt`` per process. It is written under a temporary name and renamed
when complete, so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blip2.engine import distributed
from blip2.weights import load_into, read_state_dict
from blip2.weights.loader import WEIGHTS_NAME, save_pretrained

_STEP_DIR = re.compile(r"^step_(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
             and (path / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda path: int(_STEP_DIR.match(path.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict[str, Any],
                    save_total_limit: int = 0) -> Path:
    """Every rank writes its RNG state; rank 0 writes the rest and publishes the folder by renaming it."""
    final = checkpoint_dir(output_dir, step)
    staging = final.with_name(f".tmp_{final.name}")
    if distributed.is_main_process():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    torch.save(rng_state(), staging / f"rng_rank{distributed.rank()}.pt")
    distributed.barrier()
    if distributed.is_main_process():
        save_pretrained(model, staging / "model")
        torch.save(trainer_state, staging / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        if save_total_limit > 0:
            for old in list_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the model weights and this rank's RNG state; return the trainer state for the caller to apply."""
    path = Path(path)
    if not (path / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no trainer_state.pt)")
    load_into(model, read_state_dict(path / "model" / WEIGHTS_NAME), source=str(path))
    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{distributed.rank()}.pt"
    if rng_file.is_file():
        trainer_state["rng"] = torch.load(rng_file, map_location="cpu", weights_only=False)
    return trainer_state
