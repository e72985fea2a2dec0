"""The processor of a model: the one saved where the model was read from, else one built from its config.

Shared by the Trainer (``blip2.engine``) and ``pipeline(...)`` (``blip2.pipelines``): evaluation, prediction and
pipelines preprocess one checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from blip2 import registry
from blip2.processing.image import Blip2ImageProcessor
from blip2.processing.processor import VOCAB_FILE, Blip2GenerationProcessor, Blip2Processor
from blip2.processing.tokenizer import load_tokenizer


def saved_folder(source: str | os.PathLike | None) -> Path | None:
    """The folder a model was read from (a preset's under $BLIP2_HOME), or None (an object, a file, or nothing)."""
    if source is None:
        return None
    try:
        return registry.resolve(source).folder
    except FileNotFoundError:
        return None


def model_source(model, source: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """Where the model's processor files are: ``source`` if given, else where ``from_pretrained`` read the model
    (``model.name_or_path``: a preset name or a path), else None (a model built from a config)."""
    return source if source is not None else getattr(model, "name_or_path", None)


def image_processor_for(model, source: str | os.PathLike | None, seed: int | None = None) -> Blip2ImageProcessor:
    """The image processor saved with ``source`` (a preset or a folder) if any, else one from the model's config."""
    if saved_folder(source) is not None:  # a preset, or a folder (a lone .pth file carries no processor)
        with contextlib.suppress(FileNotFoundError):
            return Blip2ImageProcessor.from_pretrained(source, seed=seed)
    config = model.config
    preset = registry.PRESETS.get(config.checkpoint_name_or_path or "")
    stats = (preset.image_mean, preset.image_std) if preset is not None else ()  # else CLIP's, the default
    return Blip2ImageProcessor(config.vision_config.image_size, *stats, seed=seed)


def saved_vocab(source: str | os.PathLike | None) -> Path | None:
    """The Q-Former vocabulary (``vocab.txt``) saved with the model ``source`` (a preset's folder or a folder)."""
    folder = saved_folder(source)
    vocab = folder / VOCAB_FILE if folder is not None else None
    return vocab if vocab is not None and vocab.is_file() else None


def default_processor(model, source: str | os.PathLike | None = None, seed: int | None = None) -> Blip2Processor:
    """The processor saved with the model (``source``, else ``model.name_or_path``: a preset or a folder) if any,
    else one built from the model's config: its image settings, the vocab.txt beside it or bert-base-uncased's."""
    source = model_source(model, source)
    vocab = saved_vocab(source)
    return Blip2Processor(image_processor_for(model, source, seed), load_tokenizer(vocab), model.config.max_txt_len)


def generation_processor(model, source: str | os.PathLike | None = None,
                         tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None
                         ) -> Blip2GenerationProcessor:
    """The image processor saved with ``source`` (else one from the model's config) and the LLM's tokenizer:
    ``tokenizer`` (a tokenizer or a folder), else the LLM folder's (``model.llm_folder``), else one saved in the
    model's folder (``source``: a transformers BLIP-2 folder with its processor, or ours with
    ``Blip2GenerationProcessor.save_pretrained``)."""
    from blip2.processing.llm_tokenizer import has_tokenizer_files, load_llm_tokenizer

    source = model_source(model, source)
    image_processor = image_processor_for(model, source)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_llm_tokenizer(tokenizer)
        return Blip2GenerationProcessor(image_processor, tokenizer)
    model_folder = saved_folder(source)
    candidates = [("the LLM folder", model.llm_folder), ("the model folder", model_folder)]
    looked = []
    for what, folder in candidates:
        if folder is not None and has_tokenizer_files(folder):
            return Blip2GenerationProcessor(image_processor, load_llm_tokenizer(folder))
        looked.append(f"{what} {folder}" if folder is not None else
                      ("no LLM folder (text_config has no checkpoint_name_or_path)" if what == "the LLM folder"
                       else "no model folder (the model was given as an object)"))
    raise FileNotFoundError(
        "no tokenizer for the LLM: looked for tokenizer.json, tokenizer.model or vocab.json + merges.txt in "
        + "; ".join(looked) + ". Pass tokenizer= (a tokenizer or its folder), or save one beside the model with "
        "Blip2GenerationProcessor(image_processor, tokenizer).save_pretrained(folder)"
    )
