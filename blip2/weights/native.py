"""Our own folder: ``config.yaml`` + ``model.safetensors`` with our key names (no translation)."""

from __future__ import annotations

from pathlib import Path

import torch

from blip2.config import Blip2Config
from blip2.weights.loader import CONFIG_NAME, WEIGHTS_NAME, read_state_dict

name = "native"


def detect(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read_config(path: Path, **_) -> Blip2Config:
    return Blip2Config.from_yaml(path / CONFIG_NAME)


def read_native_state(path: Path, config: Blip2Config, **_) -> tuple[dict[str, torch.Tensor], list[str]]:
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return read_state_dict(weights), []


def allowed_missing(model) -> list[str]:
    return []


def allowed_unexpected(model) -> list[str]:
    return []
