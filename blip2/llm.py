"""The frozen causal LLM of stage 2 and its tokenizer, read from a local folder.

This is the only module that knows how LLM folders look on disk:

- any causal LM transformers knows natively (Llama, OPT, Qwen2, GPT-2, ...): ``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``, either one possibly sharded with an index json;
- Baichuan-7B, which on the Hub needs remote code: read without running that code, as the Llama it is, with its
  fused ``self_attn.W_pack`` split into ``q_proj``/``k_proj``/``v_proj``.

Weights are read one memory-mapped shard at a time and each tensor is converted to the target dtype as it is read;
transformers then builds the model on the meta device and adopts those tensors without copying them. A bf16 load
therefore never holds a float32 copy of the model, nor a second bf16 one; the model moves to its device afterwards.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PretrainedConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from blip2.weights.loader import WeightLoadError, _first, read_state_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# in the order transformers prefers them: safetensors before pickles, an index before a single file
WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt")

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
    dtype = _resolve_dtype(dtype)
    path = text_config.get("checkpoint_name_or_path")
    if path:
        model = _load_from_folder(Path(path).expanduser(), text_config, dtype)
    elif empty:
        if device is not None:
            raise ValueError(f"empty=True leaves the LLM's parameters on the meta device: load them before moving "
                             f"the model to device={device}")
        model = _build_empty(text_config, dtype)
    else:
        model = _build_random(text_config, dtype)
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(trainable)
    return model


def load_llm_config(text_config: dict[str, Any]) -> PretrainedConfig:
    """The transformers config ``load_causal_lm`` would build the LLM from (a Baichuan folder gives a LlamaConfig)."""
    path = text_config.get("checkpoint_name_or_path")
    if path:
        return _folder_config(_existing_folder(Path(path).expanduser(), "LLM checkpoint"), text_config)[0]
    return _config_from_keys(text_config)


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.get_default_dtype()
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise LLMLoadError(f"dtype={dtype!r} is not a torch dtype (e.g. 'bfloat16', 'float16', 'float32')")
        return resolved
    return dtype


def _load_from_folder(folder: Path, text_config: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    folder = _existing_folder(folder, "LLM checkpoint")
    config, baichuan = _folder_config(folder, text_config)
    state = _read_weights(_weight_files(folder), dtype)
    if baichuan:
        state = baichuan_to_llama(state, config, source=str(folder))
    return _build_with_weights(config, state, dtype, source=str(folder))


def _folder_config(folder: Path, text_config: dict[str, Any]) -> tuple[PretrainedConfig, bool]:
    """(the folder's transformers config, is Baichuan), checked against what ``text_config`` says."""
    config, baichuan = _config_from_folder(folder)
    _check_agrees(text_config, config, baichuan, folder / CONFIG_FILE)
    return config, baichuan


def _existing_folder(path: Path, what: str) -> Path:
    if not path.exists():
        raise LLMLoadError(f"{what} folder does not exist: {path}")
    if not path.is_dir():
        raise LLMLoadError(f"{what} must be a folder, got a file: {path}")
    return path


def _read_json(path: Path) -> dict[str, Any]:
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
    raw = _read_json(config_file)
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


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of ``folder``: the shards an index names, or the one weight file."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        weight_map = _read_json(path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LLMLoadError(f"{path} has no weight_map: expected {{'weight_map': {{key: shard file}}}}")
        shards = [folder / shard for shard in dict.fromkeys(weight_map.values())]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise LLMLoadError(f"{path} names {len(missing)} shard files that are missing: {_first(missing)}")
        return shards
    raise LLMLoadError(f"{folder} has no weight files: looked for {', '.join(WEIGHT_FILES)}")


def _read_weights(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
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
        problems.append(f"{len(info['missing_keys'])} missing keys: {_first(sorted(info['missing_keys']))}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if info["mismatched_keys"]:
        mismatched = sorted(_describe_mismatch(item) for item in info["mismatched_keys"])
        problems.append(f"{len(mismatched)} tensors of the wrong shape: {_first(mismatched, 3)}")
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


def _build_random(text_config: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    config = _config_from_keys(text_config)
    model_class = _causal_lm_class(config)
    logger.info("text_config has no checkpoint_name_or_path: random %s", model_class.__name__)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _build_empty(text_config: dict[str, Any], dtype: torch.dtype) -> PreTrainedModel:
    """The model ``_build_random`` builds, in the same dtypes and with the same buffers, but with every parameter on
    the meta device: transformers' weight init then runs on shapes only, and ties the embeddings as usual."""
    config = _config_from_keys(text_config)
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered (shape and dtype, no memory, no
    values), so the initialisation that follows touches nothing. Buffers stay on CPU: the non-persistent ones that
    no checkpoint holds (rotary ``inv_freq``) keep their computed values. ``accelerate.init_empty_weights(
    include_buffers=False)``, in torch alone.
    """
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None and not param.is_meta:  # a meta parameter registered again (a tie) stays the same object
            meta = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def _config_from_keys(text_config: dict[str, Any]) -> PretrainedConfig:
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


# ---------------------------------------------------------------------------------------------------- tokenizer


class SentencePieceTokenizer(SentencePieceBackend):
    """A Llama-style tokenizer over a sentencepiece ``tokenizer.model``: exactly sentencepiece's pieces and ids
    (as the original Llama and Baichuan tokenizers), plus ``<s>``/``</s>`` as ``add_bos_token``/``add_eos_token`` say.

    Strings of special tokens in the text (``"</s>"``) become their ids, as in transformers' Llama tokenizers.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs,
    ) -> None:
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs["legacy"] = True  # plain sentencepiece: no rewriting of the dummy prefix
        super().__init__(
            vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
            pad_token=pad_token, add_bos_token=add_bos_token, add_eos_token=add_eos_token, **kwargs,
        )

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        return mask if token_ids_1 is None else mask + bos + [0] * len(token_ids_1) + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """sentencepiece decodes runs of pieces (so byte-fallback pieces become characters); special tokens stay."""
        text, pieces = "", []
        for token in tokens:
            if token in self.all_special_tokens:
                text += self.sp_model.decode(pieces) + token
                pieces = []
            else:
                pieces.append(token)
        return text + self.sp_model.decode(pieces)


def load_llm_tokenizer(
    path: str | os.PathLike, *, add_bos_token: bool | None = None, add_eos_token: bool | None = None
) -> PreTrainedTokenizerBase:
    """The tokenizer of an LLM folder, without remote code.

    - Baichuan (config.json or tokenizer_config.json says so): ``SentencePieceTokenizer`` over ``tokenizer.model``,
      with no ``<s>`` or ``</s>`` added unless tokenizer_config.json or the arguments say so (Baichuan-7B's own
      tokenizer_config.json sets both off).
    - Otherwise ``tokenizer.json`` (fast), else ``tokenizer.model`` (``SentencePieceTokenizer``; without a
      tokenizer_config.json it adds ``<s>`` and not ``</s>``, as Llama's tokenizers do), else ``vocab.json`` +
      ``merges.txt`` (GPT-2/OPT byte-level BPE), through ``AutoTokenizer`` where the folder names a class.

    ``add_bos_token``/``add_eos_token`` override the folder's choice. A missing pad token falls back to unk (id 0 in
    Llama and Baichuan, the seed's pad_token_id), else eos. ``padding_side`` is "left", so a generation batch ends
    at the last real token; pass ``padding_side="right"`` per call for training targets.
    """
    folder = _existing_folder(Path(path).expanduser(), "tokenizer")
    tokenizer = _read_tokenizer(folder)
    if add_bos_token is not None:
        tokenizer.add_bos_token = add_bos_token
    if add_eos_token is not None:
        tokenizer.add_eos_token = add_eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds tokenizer files ``load_llm_tokenizer`` reads (one of ``TOKENIZER_FILES``)."""
    folder = Path(folder).expanduser()
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _read_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    model_config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_file) if tokenizer_config_file.is_file() else {}
    baichuan = is_baichuan(model_config) or "baichuan" in str(tokenizer_config.get("tokenizer_class", "")).lower()
    has_sentencepiece = (folder / "tokenizer.model").is_file()
    if baichuan and has_sentencepiece:
        return _sentencepiece_tokenizer(folder, tokenizer_config, add_bos_default=False)
    if (folder / "tokenizer.json").is_file():
        return _auto_tokenizer(folder, fallback=lambda: PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), **_special_tokens(tokenizer_config)))
    if has_sentencepiece:
        return _sentencepiece_tokenizer(folder, tokenizer_config, add_bos_default=True)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from transformers import GPT2Tokenizer

        return _auto_tokenizer(folder, fallback=lambda: GPT2Tokenizer(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")))
    raise LLMLoadError(f"{folder} has no tokenizer files: looked for {', '.join(TOKENIZER_FILES)}")


def _auto_tokenizer(folder: Path, fallback) -> PreTrainedTokenizerBase:
    """AutoTokenizer where the folder names a tokenizer class transformers has; ``fallback()`` otherwise."""
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        logger.info("AutoTokenizer cannot read %s (%s); reading its files directly", folder, error)
        return fallback()


def _special_tokens(tokenizer_config: dict[str, Any]) -> dict[str, str]:
    """unk/bos/eos/pad strings of a tokenizer_config.json (old files store them as {"content": ...})."""
    tokens = {}
    for name in ("unk_token", "bos_token", "eos_token", "pad_token"):
        value = tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _sentencepiece_tokenizer(
    folder: Path, tokenizer_config: dict[str, Any], add_bos_default: bool
) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(
        vocab_file=str(folder / "tokenizer.model"),
        add_bos_token=bool(tokenizer_config.get("add_bos_token", add_bos_default)),
        add_eos_token=bool(tokenizer_config.get("add_eos_token", False)),
        **_special_tokens(tokenizer_config),
    )

