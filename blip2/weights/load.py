"""``from_pretrained``: resolve a name or path, pick the format adapter, read the checkpoint, build the model and load
it strictly (``loader.load_into``). The model class is passed in; this package never imports ``blip2.models``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from blip2 import registry
from blip2.config import Blip2Config
from blip2.weights import adapters, stage2
from blip2.weights.eva import fit_pos_embed
from blip2.weights.loader import load_into

logger = logging.getLogger(__name__)


def load_pretrained(cls, name_or_path: str | os.PathLike, config=None, **kwargs):
    """Build ``cls`` from a preset name, our folder, a Hugging Face BLIP-2 folder or a LAVIS ``.pth``."""
    source = registry.resolve(name_or_path, getattr(cls, "preset_group", ""))
    path = source.path
    if source.preset is not None:
        preset = source.preset
        if not preset.files:
            model = cls(config or Blip2Config.from_dict(preset.config_dict()))
            logger.info("preset %s has no weight files: random initialisation", source.name)
            return model
        message = registry.missing_files_message(preset)
        if message:
            raise FileNotFoundError(message)
        path = preset.weights_directory()
        if preset.llm:  # stage 2: the preset's config names the LLM folder under this BLIP2_HOME
            config = config or Blip2Config.from_dict(preset.config_dict())
    return load_with_adapter(cls, adapters.detect(path), path, config=config, **kwargs)


def load_with_adapter(cls, adapter, path: Path, config=None, **kwargs):
    """Build ``cls`` from ``path`` read by ``adapter``; the config comes from the source unless one is given.

    The checkpoint is read first: a stage-2 LLM it holds is then built empty and adopts its tensors, rather than being
    initialised randomly and overwritten.
    """
    config = config or adapter.read_config(path, **kwargs)
    state, dropped = adapter.read_native_state(path, config, **kwargs)
    if config.vision_config is not None:  # a config of another image size (fine-tuning at 364 px from 224)
        state = fit_pos_embed(state, config)
    model = cls(config, **stage2.build_options(cls, config, state))
    allowed_missing, preloaded = list(adapter.allowed_missing(model)), []
    if hasattr(model, "language_model"):  # stage 2: a stage-1 start, or an LLM from its own folder
        state, dropped, allowed_missing, preloaded = stage2.fit_state(model, state, dropped, allowed_missing, str(path))
    report = load_into(
        model, state, source=str(path), allowed_missing=allowed_missing,
        allowed_unexpected=adapter.allowed_unexpected(model), dropped=dropped, preloaded=preloaded,
    )
    model.load_report = report
    model.name_or_path = str(path)  # where it came from: pipelines and the Trainer read its processor files there
    if hasattr(model, "apply_freezing"):
        model.apply_freezing()
    return model
