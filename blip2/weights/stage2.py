"""The stage-2 model read from any format, after the format's own adapter has translated the names.

Two things set stage 2 apart. A stage-1 checkpoint (our folder, LAVIS ``blip2_pretrained.pth``, a transformers
retrieval folder) can start it: the ViT, ln_vision, the queries and the Q-Former's query path carry over exactly, the
Q-Former's text parts and the stage-1 heads are dropped and reported, and ``llm_proj`` starts fresh. And the LLM may
come from its own folder (``text_config.checkpoint_name_or_path``), read here before the model is built: then no
checkpoint needs to hold it (LAVIS never saves the frozen LLM; our folders refer to it instead of copying it).
"""

from __future__ import annotations

import torch

from blip2.weights.hf import TEXT_ONLY as STAGE1_ONLY  # the Q-Former's text side and the ITC / ITM / LM heads
from blip2.weights.loader import WeightLoadError, matches_any

LLM_PREFIX = "language_model."


def build_options(cls, config, state: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for building ``cls`` before ``state`` is loaded into it.

    For a stage-2 class (one with ``accepts_language_model``; this package never imports ``blip2.models``), the LLM
    built here: from text_config's folder if it names one; else, when ``state`` holds the LLM (a transformers
    generation folder, our folder saved with ``include_llm=True``), built empty on the meta device to adopt those
    tensors, never initialised only to be overwritten (for a 7B LLM: minutes and its size twice). Otherwise none:
    the model initialises its LLM randomly.
    """
    if not getattr(cls, "accepts_language_model", False) or config.text_config is None:
        return {}
    from blip2.weights.llm import build_language_model  # transformers' model classes: for stage 2 only

    holds_llm = any(key.startswith(LLM_PREFIX) for key in state)
    if not holds_llm and not config.text_config.get("checkpoint_name_or_path"):
        return {}  # a random LLM: the model draws it, in the order a plain ``cls(config)`` draws its weights
    return {"language_model": build_language_model(config, empty=holds_llm)}


def fit_state(
    model, state: dict[str, torch.Tensor], dropped: list[str], allowed_missing: list[str], source: str
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """(state, dropped, allowed_missing, preloaded) for loading ``state`` into a stage-2 ``model``."""
    _check_projection_width(model, state, source)
    stage1_keys = [key for key in state if matches_any(key, STAGE1_ONLY)]
    state = {key: value for key, value in state.items() if key not in set(stage1_keys)}
    preloaded = ["language_model.*"] if model.llm_folder else []
    if stage1_keys:  # a stage-1 checkpoint: nothing stage-2-only can be in it
        allowed_missing = allowed_missing + ["llm_proj.*", "language_model.*"]
    return state, dropped + stage1_keys, allowed_missing, preloaded


def _check_projection_width(model, state: dict[str, torch.Tensor], source: str) -> None:
    weight = state.get("llm_proj.weight")
    width = model.llm_proj.out_features
    if weight is not None and weight.shape[0] != width:
        llm = model.llm_folder or f"built from text_config (model_type={model.config.text_config.get('model_type')})"
        raise WeightLoadError(
            f"{source}: llm_proj projects to width {weight.shape[0]}, but the language model ({llm}) takes inputs "
            f"of width {width}: the checkpoint was trained for another LLM"
        )
