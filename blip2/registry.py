"""Named presets (the "support list"): a name maps to a model config and the weight files it needs.

One plain dict; no registration magic. Weight files cannot be downloaded for the user: a preset's files live in
``$BLIP2_HOME/<name>/`` (default ``~/.cache/blip2``) in our folder layout, and ``missing_files_message`` says which
files to place there and which ``blip2 convert`` command makes them from the public releases.

Stage-2 presets also name their LLM folder (``$BLIP2_HOME/<llm>/``, a transformers folder), and a training preset
starts from another preset's weights (``weights_from``: stage 2 starts from the stage-1 checkpoint, as MindFormers'
``blip2_stage2_vit_g_llama_7b`` starts from ``blip2_stage1_pretrained``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preset:
    name: str
    group: str  # "stage1", "stage2" (stage-2 training) or "itt" (stage-2 inference, image-to-text generation)
    description: str
    build_config: Callable[[], dict[str, Any]]  # the Blip2Config as a nested dict (config.py builds the object)
    files: tuple[str, ...] = ("config.yaml", "model.safetensors")  # empty: random weights (tests, demos)
    convert_hint: str = ""
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    extra: dict = field(default_factory=dict)
    weights_from: str = ""  # the preset whose folder holds the starting weights (default: this one's)
    llm: str = ""  # stage 2: the LLM folder's name under $BLIP2_HOME
    llm_hint: str = ""

    def config_dict(self) -> dict[str, Any]:
        """The preset's ``Blip2Config`` fields as a nested dict (``Blip2Config.from_pretrained(name)`` builds it)."""
        return {**self.build_config(), "checkpoint_name_or_path": self.name}

    def directory(self) -> Path:
        return blip2_home() / self.name

    def weights_directory(self) -> Path:
        return blip2_home() / (self.weights_from or self.name)


def blip2_home() -> Path:
    return Path(os.environ.get("BLIP2_HOME", Path.home() / ".cache" / "blip2")).expanduser()


def vit_g_config(image_size: int = 224) -> dict[str, Any]:
    """EVA-CLIP ViT-g/14 with its last block dropped (39 of 40 blocks), as BLIP-2 uses it."""
    return {"image_size": image_size, "patch_size": 14, "hidden_size": 1408, "num_hidden_layers": 39,
            "num_attention_heads": 16, "intermediate_size": 6144}


def _stage1_vit_g() -> dict[str, Any]:
    """ViT-g + the bert-base Q-Former (the config's defaults)."""
    return {"vision_config": vit_g_config(), "qformer_config": {}, "embed_dim": 256, "max_txt_len": 32}


def _tiny() -> dict[str, Any]:
    """A few-hundred-thousand-parameter model (plus the real 30523-word vocabulary) for tests and the demo."""
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 128}
    qformer = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
               "query_length": 8, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
               "attention_probs_dropout_prob": 0.0}
    return {"vision_config": vision, "qformer_config": qformer, "embed_dim": 32, "max_txt_len": 32,
            "freeze_vision": False, "compute_dtype": "float32"}


def _tiny_stage2() -> dict[str, Any]:
    """The tiny model with a tiny random LLaMA (the real 32000-word vocabulary) for tests and demos."""
    llama = {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 32000, "max_position_embeddings": 128,
             "rms_norm_eps": 1e-6, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "seq_length": 48}
    return {**_tiny(), "text_config": llama}


def _llama_7b(llm: str, model_type: str = "llama", vocab_size: int = 32000) -> dict:
    """LLaMA-7B's shape as MindFormers' stage-2 YAMLs give it; the weights are read from ``$BLIP2_HOME/<llm>/``.

    The folder's own config.json is the one used; these keys document the shape and are checked against it. The
    frozen LLM's weights are kept in bf16 (MindFormers keeps them in fp16).
    """
    return {"checkpoint_name_or_path": str(blip2_home() / llm), "seq_length": 64, "dtype": "bfloat16",
            "model_type": model_type, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
            "intermediate_size": 11008, "vocab_size": vocab_size, "rms_norm_eps": 1e-6, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 0}


def _stage2_vit_g(text_config: dict) -> dict[str, Any]:
    return {**_stage1_vit_g(), "text_config": text_config}


def _stage2_llama_7b() -> dict[str, Any]:
    return _stage2_vit_g(_llama_7b("llama_7b"))


def _stage2_baichuan_7b() -> dict[str, Any]:
    # Baichuan-7B's own vocabulary (64000); MindFormers' YAML counts 64001 with the <pad> it adds
    return _stage2_vit_g(_llama_7b("baichuan_7b", model_type="baichuan", vocab_size=64000))


def _opt_2_7b() -> dict[str, Any]:
    """transformers' Salesforce/blip2-opt-2.7b (the folder's config.json is the one read when loading)."""
    opt = {"model_type": "opt", "hidden_size": 2560, "num_hidden_layers": 32, "ffn_dim": 10240,
           "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
           "word_embed_proj_dim": 2560, "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1}
    vision = {**vit_g_config(), "ln_vision_eps": 1e-6}  # transformers' post_layernorm eps
    return {"vision_config": vision, "qformer_config": {}, "text_config": opt, "embed_dim": 256, "max_txt_len": 32}


_LAVIS_STAGE1 = (
    "convert the LAVIS release: blip2 convert --from lavis --input blip2_pretrained.pth --vit eva_vit_g.pth "
    "--config blip2_stage1_vit_g --output {dir}   (or a Hugging Face folder: blip2 convert --from hf "
    "--input blip2-itm-vit-g/ --output {dir})"
)

_STAGE2 = (
    "save a stage-2 model there: Blip2ImageToTextGeneration.save_pretrained({dir}) after stage-2 training writes "
    "config.yaml + model.safetensors and refers to the LLM folder"
)
_HF_OPT = (
    "download the transformers folder Salesforce/blip2-opt-2.7b into {dir} (config.json, model-*.safetensors and "
    "model.safetensors.index.json; e.g. huggingface-cli download Salesforce/blip2-opt-2.7b --local-dir {dir})"
)
_LLAMA = "a transformers LLaMA-7B folder (config.json, the tokenizer files, *.safetensors)"
_BAICHUAN = "a transformers Baichuan-7B folder (config.json, the tokenizer files, *.bin or *.safetensors)"

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
    "blip2_stage2_vit_g_llama_7b": Preset(
        "blip2_stage2_vit_g_llama_7b", "stage2", "stage-2 training: the stage-1 ViT-g + Q-Former feeding LLaMA-7B",
        _stage2_llama_7b, convert_hint=_LAVIS_STAGE1, weights_from="blip2_stage1_vit_g", llm="llama_7b",
        llm_hint=_LLAMA,
    ),
    "blip2_stage2_vit_g_baichuan_7b": Preset(
        "blip2_stage2_vit_g_baichuan_7b", "stage2",
        "stage-2 training: the stage-1 ViT-g + Q-Former feeding Baichuan-7B", _stage2_baichuan_7b,
        convert_hint=_LAVIS_STAGE1, weights_from="blip2_stage1_vit_g", llm="baichuan_7b", llm_hint=_BAICHUAN,
    ),
    "itt_blip2_stage2_vit_g_llama_7b": Preset(
        "itt_blip2_stage2_vit_g_llama_7b", "itt", "image-to-text generation with the stage-2 LLaMA-7B model",
        _stage2_llama_7b, convert_hint=_STAGE2, llm="llama_7b", llm_hint=_LLAMA,
    ),
    "itt_blip2_stage2_vit_g_baichuan_7b": Preset(
        "itt_blip2_stage2_vit_g_baichuan_7b", "itt", "image-to-text generation with the stage-2 Baichuan-7B model",
        _stage2_baichuan_7b, convert_hint=_STAGE2, llm="baichuan_7b", llm_hint=_BAICHUAN,
    ),
    "blip2_opt_2.7b": Preset(
        "blip2_opt_2.7b", "itt", "image-to-text generation with the released BLIP-2 OPT-2.7b (transformers folder)",
        _opt_2_7b, files=("config.json",), convert_hint=_HF_OPT,
    ),
    "blip2_stage2_tiny": Preset(
        "blip2_stage2_tiny", "stage2", "tiny random stage-2 model (tiny random LLaMA) for tests and demos",
        _tiny_stage2, files=(),
    ),
}


def names(group: str | tuple[str, ...] = "") -> list[str]:
    """Preset names, all or those of one group (or of several)."""
    groups = (group,) if isinstance(group, str) else group
    return [name for name, preset in PRESETS.items() if not group or preset.group in groups]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]


def llm_directory(preset: Preset) -> Path | None:
    return blip2_home() / preset.llm if preset.llm else None


def missing_files_message(preset: Preset) -> str | None:
    """None when every file of ``preset`` (and its LLM folder) is in place, else what to place where and how."""
    directory = preset.weights_directory()
    missing = [name for name in preset.files if not (directory / name).is_file()]
    problems = []
    if missing:
        hint = preset.convert_hint.format(dir=directory)
        problems.append(f"its weight files in {directory}/; missing: {', '.join(missing)}. {hint}")
    llm_dir = llm_directory(preset)
    if llm_dir is not None and not (llm_dir / "config.json").is_file():
        problems.append(f"its language model in {llm_dir}/: {preset.llm_hint}; missing: config.json")
    if not problems:
        return None
    return (
        f"preset {preset.name!r} needs " + "; and ".join(problems)
        + " (set BLIP2_HOME to move them). Nothing is downloaded."
    )


@dataclass(frozen=True)
class Source:
    """What a ``name_or_path`` names: a preset (``preset`` set; ``path`` is its folder under ``$BLIP2_HOME``, which
    need not exist) or an existing file or folder (``preset`` None)."""

    name: str
    path: Path
    preset: Preset | None = None

    @property
    def folder(self) -> Path | None:
        """The folder files saved with the model would be in (a preset's, or the folder itself); None for a file."""
        if self.preset is not None:
            return self.path
        return self.path if self.path.is_dir() else None

    def saved_file(self, name: str) -> Path | None:
        """``name`` in ``folder`` when it is there, else None."""
        folder = self.folder
        return folder / name if folder is not None and (folder / name).is_file() else None


def resolve(name_or_path: str | os.PathLike, group: str | tuple[str, ...] = "") -> Source:
    """The one resolver: a preset name or an existing path, else ``FileNotFoundError`` listing the presets (of
    ``group`` when given). Every ``from_pretrained`` starts here."""
    name = str(name_or_path)
    if name in PRESETS:
        return Source(name, PRESETS[name].directory(), PRESETS[name])
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r} is neither an existing file or folder nor a preset; presets: {', '.join(names(group))}"
        )
    return Source(name, path)
