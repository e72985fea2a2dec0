"""Named presets (the "support list"): a name maps to a model config and the weight files it needs.

One plain dict; no registration magic. Weight files cannot be downloaded for the user: a preset's files live in
``$BLIP2_HOME/<name>/`` (default ``~/.cache/blip2``) in our folder layout, and ``missing_files_message`` says which
files to place there and which ``blip2 convert`` command makes them from the public releases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from blip2.config import Blip2Config, QformerConfig, ViTConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preset:
    name: str
    group: str  # "stage1", "stage2" or "itt" (stage-2 inference)
    description: str
    build_config: Callable[[], Blip2Config]
    files: tuple[str, ...] = ("config.yaml", "model.safetensors")  # empty: random weights (tests, demos)
    convert_hint: str = ""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    extra: dict = field(default_factory=dict)

    def config(self) -> Blip2Config:
        config = self.build_config()
        config.checkpoint_name_or_path = self.name
        return config

    def directory(self) -> Path:
        return blip2_home() / self.name


def blip2_home() -> Path:
    return Path(os.environ.get("BLIP2_HOME", Path.home() / ".cache" / "blip2")).expanduser()


def vit_g_config(image_size: int = 224) -> ViTConfig:
    """EVA-CLIP ViT-g/14 with its last block dropped (39 of 40 blocks), as BLIP-2 uses it."""
    return ViTConfig(image_size=image_size, patch_size=14, hidden_size=1408, num_hidden_layers=39,
                     num_attention_heads=16, intermediate_size=6144)


def _stage1_vit_g() -> Blip2Config:
    return Blip2Config(vision_config=vit_g_config(), qformer_config=QformerConfig(), embed_dim=256, max_txt_len=32)


def _tiny() -> Blip2Config:
    """A few-hundred-thousand-parameter model (plus the real 30523-word vocabulary) for tests and the demo."""
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)
    qformer = QformerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            query_length=8, max_position_embeddings=64, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, embed_dim=32, max_txt_len=32,
                       freeze_vision=False, compute_dtype="float32")


_LAVIS_STAGE1 = (
    "convert the LAVIS release: blip2 convert --from lavis --input blip2_pretrained.pth --vit eva_vit_g.pth "
    "--config blip2_stage1_vit_g --output {dir}   (or a Hugging Face folder: blip2 convert --from hf "
    "--input blip2-itm-vit-g/ --output {dir})"
)

PRESETS: dict[str, Preset] = {
    "blip2_stage1_vit_g": Preset(
        "blip2_stage1_vit_g", "stage1", "stage-1 pretraining: ViT-g/14 at 224 + Q-Former (bert-base, 32 queries)",
        _stage1_vit_g, convert_hint=_LAVIS_STAGE1,
    ),
    "blip2_stage1_classification": Preset(
        "blip2_stage1_classification", "stage1", "zero-shot image classification with the stage-1 weights",
        _stage1_vit_g, convert_hint=_LAVIS_STAGE1,
    ),
    "blip2_stage1_evaluator": Preset(
        "blip2_stage1_evaluator", "stage1", "image-text retrieval evaluation (ITC top-k, ITM re-rank)",
        _stage1_vit_g, convert_hint=_LAVIS_STAGE1,
    ),
    "blip2_tiny": Preset(
        "blip2_tiny", "stage1", "tiny random model for tests and demos (no weight files)", _tiny, files=(),
    ),
}


def names(group: str = "") -> list[str]:
    return [name for name, preset in PRESETS.items() if not group or preset.group == group]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def missing_files_message(preset: Preset) -> str | None:
    """None when every file of ``preset`` is in place, else what to place where and how to make it."""
    directory = preset.directory()
    missing = [name for name in preset.files if not (directory / name).is_file()]
    if not missing:
        return None
    hint = preset.convert_hint.format(dir=directory)
    return (
        f"preset {preset.name!r} needs its weight files in {directory}/ (set BLIP2_HOME to move it); missing: "
        f"{', '.join(missing)}. Nothing is downloaded: {hint}"
    )
