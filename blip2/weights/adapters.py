"""Format detection: which adapter reads a given path. Each adapter module offers
``detect(path)``, ``read_config(path, **kw)``, ``read_native_state(path, config, **kw) -> (state, dropped keys)``,
``allowed_missing(model)`` and ``allowed_unexpected(model)``.

Order: the folder formats first (a look at one file), then LAVIS (opens the checkpoint to find its sentinel keys).
"""

from __future__ import annotations

from pathlib import Path

from blip2.weights import hf, lavis, native

ADAPTERS = [native, hf, lavis]


def register(adapter) -> None:
    if adapter not in ADAPTERS:
        ADAPTERS.append(adapter)


def detect(path: Path):
    for adapter in ADAPTERS:
        if adapter.detect(path):
            return adapter
    raise ValueError(
        f"cannot tell the checkpoint format of {path}: expected one of our folders (config.yaml + model.safetensors), "
        "a Hugging Face BLIP-2 folder (config.json) or a LAVIS .pth file (an EVA eva_vit_g.pth alone is not a "
        "model: pass it as vit_checkpoint= along with the LAVIS checkpoint)"
    )
