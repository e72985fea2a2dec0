"""Format detection: which adapter reads a given path. Each adapter module offers
``detect(path)``, ``read_config(path)``, ``read_native_state(path, config)``, ``allowed_missing(model)`` and
``allowed_unexpected(model)``."""

from __future__ import annotations

from pathlib import Path

from blip2.weights import native

ADAPTERS = [native]


def register(adapter) -> None:
    if adapter not in ADAPTERS:
        ADAPTERS.append(adapter)


def detect(path: Path):
    for adapter in ADAPTERS:
        if adapter.detect(path):
            return adapter
    raise ValueError(
        f"cannot tell the checkpoint format of {path}: expected one of our folders (config.yaml + model.safetensors), "
        "a Hugging Face BLIP-2 folder (config.json) or a LAVIS .pth file"
    )
