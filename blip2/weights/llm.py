"""The frozen causal LLM of stage 2, read from a local folder (its tokenizer: ``blip2.processing.llm_tokenizer``).

This is the only module that knows how LLM weight folders look on disk:

- any causal LM transformers knows natively (Llama, OPT, Qwen2, GPT-2, ...): ``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``, either one possibly sharded with an index json;
- Baichuan-7B, which on the Hub needs remote code: read without running that code, as the Llama it is, with its
  fused ``self_attn.W_pack`` split into ``q_proj``/``k_proj``/``v_proj``.

Weights are read one memory-mapped shard at a time and each tensor is converted to the target dtype as it is read;
transformers then builds the model on the meta device and adopts those tensors without copying them. A bf16 load
therefore never holds a float32 copy of the model, nor a second bf16 one, and never initialises it randomly; the
model moves to its device afterwards. An LLM built ``empty`` (its weights come next, from a BLIP-2 checkpoint) is
built under ``torch.device("meta")`` as transformers' own ``from_pretrained`` builds it: no monkey-patching.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from blip2.weights.loader import WeightLoadError, first_keys, read_state_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# in the order transformers prefers them: safetensors before pickles, an index before a single file
WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)

# Keys our configs add to ``text_config`` that are not the LLM's own transformers config keys: where the weights
# are, the sequence budget of stage 2, and the seed's generation settings (read by the generation code).
BLIP2_TEXT_KEYS = frozenset({
    "checkpoint_name_or_path", "seq_length",
    "max_decode_length", "use_past", "do_sample", "top_k", "top_p", "repetition_penalty",
})
# text_config keys that must agree with a checkpoint folder's config.json when both give them
_SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")

BAICHUAN_ARCHITECTURES = ("BaiChuanForCausalLM", "BaichuanForCausalLM")
BAICHUAN2_VOCAB_SIZE = 125696


class LLMLoadError(WeightLoadError):
    """An LLM folder, its weights or ``text_config`` cannot give a causal LM; the message names the file or key."""


class UnsupportedLLMError(LLMLoadError, NotImplementedError):
    """A model we recognise but cannot run faithfully (it would give wrong numbers); the message says why."""


# ---------------------------------------------------------------------------------------------------- the model


def load_causal_lm(
    text_config: dict[str, Any],
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    trainable: bool = False,
    empty: bool = False,
) -> PreTrainedModel:
    """The LLM of ``text_config``: weights from ``checkpoint_name_or_path`` (a local folder), else random init.

    ``dtype`` (default: torch's default dtype, float32) is what the floating-point weights are converted to as they
    are read; ``device`` (default: CPU) is where the model goes once built. Weights pass through host memory once,
    in ``dtype`` (transformers places them on CPU without ``accelerate``). The model comes back in eval mode with
    every parameter frozen (``requires_grad=False``) unless ``trainable=True``.

    ``empty=True`` (for a caller that loads every weight next, e.g. from a BLIP-2 checkpoint that holds the LLM)
    builds the parameters on the meta device instead of initialising them randomly: no memory, no init time. Buffers
    are still computed on CPU. A folder in ``checkpoint_name_or_path`` wins over ``empty``.
    """
    dtype = resolve_dtype(dtype)
    path = text_config.get("checkpoint_name_or_path")
    if path:
        model = load_from_folder(path, text_config, dtype)
    elif empty:
        if device is not None:
            raise ValueError(f"empty=True leaves the LLM's parameters on the meta device: load them before moving "
                             f"the model to device={device}")
        model = build_empty_causal_lm(config_from_keys(text_config), dtype)
    else:
        model = build_random_causal_lm(text_config, dtype)
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(trainable)
    return model


def build_language_model(config, *, empty: bool = False) -> PreTrainedModel:
    """The LLM of a stage-2 ``config`` (a ``Blip2Config``): ``load_causal_lm`` of its ``text_config``, in
    ``text_config.dtype`` (float32 if unset), trainable only when ``freeze_text`` is off; ``empty`` as there."""
    text_config = config.text_config
    return load_causal_lm(text_config, dtype=text_config.get("dtype"), trainable=not config.freeze_text, empty=empty)


def load_llm_config(text_config: dict[str, Any]) -> PretrainedConfig:
    """The transformers config ``load_causal_lm`` would build the LLM from (a Baichuan folder gives a LlamaConfig)."""
    path = text_config.get("checkpoint_name_or_path")
    if path:
        return _folder_config(existing_folder(path, "LLM checkpoint"), text_config)[0]
    return config_from_keys(text_config)


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from ``None`` (torch's default), a dtype, or its name (``"bfloat16"``, ``"torch.float16"``)."""
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise LLMLoadError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')")
        return resolved
    return dtype


def load_from_folder(
    path: str | os.PathLike, text_config: dict[str, Any], dtype: torch.dtype | str | None = None
) -> PreTrainedModel:
    """The causal LM of the LLM folder ``path`` (sizes checked against ``text_config``), its weights in ``dtype``.

    transformers builds it on the meta device and adopts the tensors read here: no random init, no second copy.
    """
    folder = existing_folder(path, "LLM checkpoint")
    dtype = resolve_dtype(dtype)
    config, baichuan = _folder_config(folder, text_config)
    state = read_llm_weights(llm_weight_files(folder), dtype)
    if baichuan:
        state = baichuan_to_llama(state, config, source=str(folder))
    return _build_with_weights(config, state, dtype, source=str(folder))


def _folder_config(folder: Path, text_config: dict[str, Any]) -> tuple[PretrainedConfig, bool]:
    """(the folder's transformers config, is Baichuan), checked against what ``text_config`` says."""
    config, baichuan = _config_from_folder(folder)
    _check_agrees(text_config, config, baichuan, folder / CONFIG_FILE)
    return config, baichuan


def existing_folder(path: str | os.PathLike, what: str) -> Path:
    """``path`` (``~`` expanded) if it is a folder; else LLMLoadError naming ``what`` and the path."""
    path = Path(path).expanduser()
    if not path.exists():
        raise LLMLoadError(f"{what} folder does not exist: {path}")
    if not path.is_dir():
        raise LLMLoadError(f"{what} must be a folder, got a file: {path}")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; LLMLoadError naming the file if it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise LLMLoadError(f"{path} is not valid JSON: {error}") from None


def _config_from_folder(folder: Path) -> tuple[PretrainedConfig, bool]:
    """(transformers config, is Baichuan) from ``folder/config.json``, never running remote code."""
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise LLMLoadError(f"{folder} has no {CONFIG_FILE}: expected a transformers LLM folder (config.json + weights)")
    raw = read_json(config_file)
    if is_baichuan(raw):
        return baichuan_llama_config(raw, source=str(config_file)), True
    model_type = raw.get("model_type")
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True), False
    except (ValueError, StrictDataclassError) as error:
        if model_type is None or model_type not in _known_model_types():
            raise LLMLoadError(
                f"{config_file}: model_type={model_type!r} is not a transformers model type and blip2 does not run "
                "remote code; use a causal LM transformers knows (llama, opt, qwen2, gpt2, ...) or Baichuan-7B"
            ) from None
        raise LLMLoadError(f"{config_file}: {error}") from None


def _known_model_types() -> set[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


def _check_agrees(text_config: dict[str, Any], config: PretrainedConfig, baichuan: bool, source: Path) -> None:
    """text_config's model_type and sizes, where given, must match the checkpoint's (stage 2 sizes llm_proj from
    them); the folder's other config keys win without a check."""
    folder_type = "baichuan" if baichuan else config.model_type
    wanted_type = text_config.get("model_type")
    disagree = []
    if wanted_type is not None and wanted_type != folder_type:
        disagree.append(f"model_type={wanted_type!r} (checkpoint: {folder_type!r})")
    disagree += [
        f"{key}={text_config[key]} (checkpoint: {getattr(config, key)})"
        for key in _SIZE_KEYS
        if key in text_config and getattr(config, key, None) is not None and getattr(config, key) != text_config[key]
    ]
    if disagree:
        raise LLMLoadError(f"text_config disagrees with {source}: " + ", ".join(disagree))


def llm_weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of ``folder``: the shards an index names, or the one weight file."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LLMLoadError(f"{path} has no weight_map: expected {{'weight_map': {{key: shard file}}}}")
        shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise LLMLoadError(f"{path} names {len(missing)} shard files that are missing: {first_keys(missing)}")
        return shards
    raise LLMLoadError(f"{folder} has no weight files: looked for {', '.join(WEIGHT_FILES)}")


def read_llm_weights(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` in ``dtype``, converted shard by shard as it is read.

    Shards are memory-mapped (safetensors, zip-format .bin), so a shard's stored copy is file-backed pages, never a
    second full-size allocation; integer tensors keep their dtype.
    """
    state: dict[str, torch.Tensor] = {}
    for file in files:
        shard = read_state_dict(file)
        for key in list(shard):
            tensor = shard.pop(key)
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        del shard
    return state


def _build_with_weights(
    config: PretrainedConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str
) -> PreTrainedModel:
    """transformers' causal-LM class for ``config``, built on meta and given ``state`` (adopted, not copied)."""
    model_class = _causal_lm_class(config)
    try:
        # ignore_mismatched_sizes: wrong shapes come back in the loading info, by name, and _check_loading_info raises
        model, info = model_class.from_pretrained(
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (RuntimeError, ValueError) as error:
        raise LLMLoadError(f"{source}: the weights do not fit {model_class.__name__}: {error}") from None
    _check_loading_info(info, source, model_class.__name__)
    return model


def _causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise LLMLoadError(
            f"model_type={config.model_type!r} has no causal-LM class in transformers (AutoModelForCausalLM)"
        ) from None


def _check_loading_info(info: dict[str, Any], source: str, class_name: str) -> None:
    """Strict: every model tensor loaded, every checkpoint tensor used, no size mismatch."""
    unexpected = sorted(key for key in info["unexpected_keys"] if not key.endswith("rotary_emb.inv_freq"))
    problems = []
    if info["missing_keys"]:
        problems.append(f"{len(info['missing_keys'])} missing keys: {first_keys(sorted(info['missing_keys']))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {first_keys(unexpected)}")
    if info["mismatched_keys"]:
        mismatched = sorted(_describe_mismatch(item) for item in info["mismatched_keys"])
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {first_keys(mismatched, 3)}")
    if info.get("error_msgs"):
        problems.append("; ".join(str(message) for message in info["error_msgs"]))
    if problems:
        raise LLMLoadError(f"{source} does not fit {class_name}: " + "; ".join(problems))


def _describe_mismatch(item) -> str:
    """transformers reports (key, checkpoint shape, model shape)."""
    if isinstance(item, tuple) and len(item) == 3:
        key, stored, wanted = item
        return f"{key}: checkpoint {tuple(stored)} vs model {tuple(wanted)}"
    return str(item)


def build_random_causal_lm(text_config: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised causal LM from ``text_config``'s transformers keys (``model_type`` picks the class)."""
    config = config_from_keys(text_config)
    model_class = _causal_lm_class(config)
    logger.info("text_config has no checkpoint_name_or_path: random %s", model_class.__name__)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def build_empty_causal_lm(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model ``build_random_causal_lm`` builds, in the same dtypes, ties and buffers, but with every parameter
    on the meta device (shape and dtype only: no memory, no values), for a caller that loads every weight next.

    Built as transformers' ``from_pretrained`` builds a model before loading: under ``torch.device("meta")`` (where
    transformers skips its weight init), then the non-persistent buffers no checkpoint holds (rotary ``inv_freq``)
    are brought to CPU and computed by transformers' own ``initialize_weights``, which on the meta parameters
    touches shapes only.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, buffer in list(model.named_non_persistent_buffers()):
        module_name, _, attribute = name.rpartition(".")
        model.get_submodule(module_name).register_buffer(
            attribute, torch.empty_like(buffer, device="cpu"), persistent=False
        )
    model.initialize_weights()
    return model


def config_from_keys(text_config: dict[str, Any]) -> PretrainedConfig:
    """A transformers config from ``text_config`` minus ``BLIP2_TEXT_KEYS``; ``model_type`` picks the class."""
    keys = {key: value for key, value in text_config.items() if key not in BLIP2_TEXT_KEYS}
    model_type = keys.pop("model_type", None)
    if model_type is None:
        raise LLMLoadError(
            "text_config needs checkpoint_name_or_path (an LLM folder) or model_type (e.g. 'llama', 'opt', "
            "'qwen2', 'gpt2') to build a random LLM"
        )
    if model_type == "baichuan":
        return baichuan_llama_config(keys, source="text_config")
    if model_type not in _known_model_types():
        raise LLMLoadError(
            f"text_config.model_type={model_type!r} is not a transformers model type (e.g. 'llama', 'opt', "
            "'qwen2', 'gpt2'; or 'baichuan')"
        )
    try:
        return AutoConfig.for_model(model_type, **keys)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise LLMLoadError(f"text_config does not make a {model_type} config: {error}") from None


# ---------------------------------------------------------------------------------------------------- Baichuan


def is_baichuan(raw_config: dict[str, Any]) -> bool:
    """A Baichuan config.json (model_type ``baichuan`` or a Baichuan architecture)."""
    architectures = raw_config.get("architectures") or []
    return raw_config.get("model_type") == "baichuan" or any(name in BAICHUAN_ARCHITECTURES for name in architectures)


def baichuan_llama_config(raw: dict[str, Any], source: str) -> LlamaConfig:
    """The LlamaConfig equal to a Baichuan-7B config; Baichuan-13B and Baichuan2 are refused by name.

    Baichuan-7B is Llama with a fused q/k/v projection: RoPE (base 10000), SwiGLU MLP, RMSNorm, untied head.
    Baichuan-13B uses ALiBi instead of RoPE and Baichuan2 normalises its output head, so a Llama would give wrong
    numbers for them.
    """
    hidden, layers = raw.get("hidden_size"), raw.get("num_hidden_layers")
    name = str(raw.get("_name_or_path", "")).lower()
    if hidden == 5120 or layers == 40 or "13b" in name:
        raise UnsupportedLLMError(
            f"{source} is Baichuan-13B (hidden_size={hidden}, num_hidden_layers={layers}), which uses ALiBi "
            "position biases instead of rotary embeddings; only Baichuan-7B (rotary, as Llama) is supported"
        )
    if raw.get("vocab_size") == BAICHUAN2_VOCAB_SIZE or "baichuan2" in name:
        raise UnsupportedLLMError(
            f"{source}: this is Baichuan2 (vocab_size={raw.get('vocab_size')}), whose output head is normalised "
            "(NormHead); only Baichuan-7B is supported"
        )
    missing = [key for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if key not in raw]
    if missing:
        raise LLMLoadError(f"{source}: Baichuan config lacks {', '.join(missing)}")
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=layers,
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_attention_heads"],
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=raw.get("max_position_embeddings") or raw.get("model_max_length") or 4096,
        initializer_range=raw.get("initializer_range", 0.02),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        bos_token_id=raw.get("bos_token_id", 1),
        eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0),
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )


def baichuan_to_llama(
    state: dict[str, torch.Tensor], config: LlamaConfig, source: str
) -> dict[str, torch.Tensor]:
    """Baichuan-7B keys to Llama's: ``W_pack`` rows [0:h], [h:2h], [2h:3h] are q, k, v; stored rotary frequencies
    (a buffer Llama recomputes) are dropped. Every other key is already Llama's."""
    hidden = config.hidden_size
    converted: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if not key.endswith("self_attn.W_pack.weight"):
            converted[key] = tensor
            continue
        if tuple(tensor.shape) != (3 * hidden, hidden):
            raise LLMLoadError(
                f"{source}: {key} has shape {tuple(tensor.shape)}, expected (3 * hidden_size, hidden_size) = "
                f"{(3 * hidden, hidden)}"
            )
        prefix = key.removesuffix("W_pack.weight")
        query, key_proj, value = tensor.split(hidden, dim=0)  # row blocks of a contiguous matrix: no copies
        converted[prefix + "q_proj.weight"] = query
        converted[prefix + "k_proj.weight"] = key_proj
        converted[prefix + "v_proj.weight"] = value
    return converted
