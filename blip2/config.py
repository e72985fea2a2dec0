"""Model configuration: small dataclasses that load from and save to YAML.

Every field name follows the seed (MindFormers) and transformers' vocabulary. Unknown keys are errors that name the
key and list the valid ones, so a typo in a YAML file never silently falls back to a default. This module sits at the
bottom of the package: it imports only ``registry`` (preset names) and ``files`` (atomic writes of our own files).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from blip2 import files, registry

T = TypeVar("T", bound="ConfigBase")

_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


class ConfigBase:
    """Shared dict/YAML round trip for the config dataclasses.

    ``nested`` names the fields holding another config section; a plain dict given there (from YAML or code) becomes
    that section in ``__post_init__``. Subclasses put their checks in ``validate``, which runs after that conversion
    and again when ``validate_tree`` re-checks a tree after ``--set`` overrides.
    """

    nested: ClassVar[dict[str, type]] = {}

    def __post_init__(self) -> None:
        prefix = f"{self.section_name}." if self.section_name else ""
        for name, section in self.nested.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, section.from_dict(value, where=f"{prefix}{name}"))
        self.validate()

    #: the YAML path of this section in error messages ("" at the top)
    section_name: ClassVar[str] = ""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the key when a value is out of range (overridden by the sections)."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None, *, where: str = "") -> T:
        """Build from a plain dict; an unknown key raises ConfigError naming it."""
        data = dict(data or {})
        prefix = f"{where}." if where else ""
        valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        if "type" not in valid:  # the seed's `type: Blip2Config` marker names the class
            type_name = data.pop("type", None)
            if type_name is not None and type_name != cls.__name__:
                raise ConfigError(f"{prefix}type={type_name!r} does not match {cls.__name__}")
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise ConfigError(
                f"unknown config key '{prefix}{unknown[0]}' for {cls.__name__}; valid keys: {', '.join(valid)}"
            )
        kwargs: dict[str, Any] = {}
        declared = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        for name, value in data.items():
            nested = cls.nested.get(name)
            if nested is not None and isinstance(value, dict):
                value = nested.from_dict(value, where=f"{prefix}{name}")
            kwargs[name] = coerce_number(f"{prefix}{name}", value, declared[name].default, declared[name].type)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_yaml(cls: type[T], path: str | os.PathLike) -> T:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle) or {}
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
                              ) from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML{_yaml_where(err)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_yaml(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.to_dict(), handle, sort_keys=False)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _yaml_where(error: yaml.YAMLError) -> str:
    """`` at line L, column C: problem`` from a yaml error (1-based, as editors count), on one line."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    text = f"{context}; {problem}" if context else problem
    return f"{where}: {' '.join(str(text).split())}"


def _number_kind(default: Any, annotation: Any) -> type | None:
    """int or float when the field holds a number: from its default (or current value), or when that is None from
    a simple annotation (``int | None``, ``Optional[float]``); None otherwise (bools are not numbers)."""
    if isinstance(default, bool):
        return None
    if isinstance(default, (int, float)):
        return float if isinstance(default, float) else int
    if default is not None or annotation is None:
        return None
    if isinstance(annotation, str):
        text = annotation.replace(" ", "").removeprefix("Optional[").removesuffix("]")
        names = set(text.split("|")) - {"None"}
        return {"int": int, "float": float}.get(names.pop()) if len(names) == 1 else None
    return annotation if annotation in (int, float) else None


def coerce_number(key: str, value: Any, default: Any, annotation: Any = None) -> Any:
    """Give number fields numbers, or name the bad key.

    The field's kind comes from its ``default`` (or, when that is None, its type ``annotation``). YAML reads ``1e-4``
    as a string and ``1`` as an int: float fields get floats; int fields take ints, integral floats and strings
    (``1e3``) but not ``1.5``. A list, a dict or a bool for a number raises ``ConfigError``; ``None`` stays allowed
    where the default is None or the annotation admits it (or no annotation is known: a key in a plain dict).
    """
    kind = _number_kind(default, annotation)
    if kind is None or (value is None and (default is None or annotation is None or _allows_none(annotation))):
        return value
    expected = "an integer" if kind is int else "a number"
    if value is None:
        raise ConfigError(f"{key} is null: expected {expected}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}={' '.join(repr(value).split())} is a {_yaml_type(value)}: expected {expected}")
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} is not an integer") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{key}={value!r} is not an integer")
        return int(value)
    return value


def _allows_none(annotation: Any) -> bool:
    if isinstance(annotation, str):
        return "None" in annotation.replace(" ", "").split("|") or annotation.startswith("Optional[")
    return False


def _yaml_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _check_positive(owner: str, **values: int | float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{owner}.{name}={value} must be positive")


def _check_divides(owner: str, hidden_size: int, num_heads: int) -> None:
    if hidden_size % num_heads != 0:
        raise ConfigError(
            f"{owner}.num_attention_heads={num_heads} must divide {owner}.hidden_size={hidden_size}"
        )


@dataclass
class ViTConfig(ConfigBase):
    """EVA ViT image encoder (defaults: EVA-CLIP ViT-g/14 with its last block dropped, as BLIP-2 uses it)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    intermediate_size: int = 6144
    layer_norm_eps: float = 1e-6  # the ViT blocks' norms
    ln_vision_eps: float = 1e-5  # the trainable ln_vision after the ViT (LAVIS uses torch's default)
    qkv_bias: bool = True  # q and v biases; the k bias is always zero (EVA)
    drop_path_rate: float = 0.0
    use_grad_checkpoint: bool = False
    # amplitude of the 2-D sine-cosine position table of a randomly initialised ViT (MAE uses 1.0); loaded weights
    # replace it. It sets how loud positions are against the patch embeddings in a random (e.g. frozen) encoder
    position_init_amplitude: float = 0.3

    def validate(self) -> None:
        _check_positive("vision_config", image_size=self.image_size, patch_size=self.patch_size,
                        hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                        num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size)
        _check_divides("vision_config", self.hidden_size, self.num_attention_heads)
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"vision_config.patch_size={self.patch_size} must divide vision_config.image_size={self.image_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"vision_config.drop_path_rate={self.drop_path_rate} must be in [0, 1)")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class QformerConfig(ConfigBase):
    """Q-Former: a BERT-base encoder with learned queries and cross-attention to the image every few layers.

    The cross-attention key/value width is the ViT's hidden size; it is read from ``Blip2Config.vision_config`` and
    never stored here a second time.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    query_length: int = 32
    cross_attention_freq: int = 2
    vocab_size: int = 30523  # bert-base-uncased (30522) + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    bos_token_id: int = 30522  # [DEC], replaces [CLS] for the language-modelling pass
    pad_token_id: int = 0
    sep_token_id: int = 102  # [SEP], the end of a caption
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    # std of the Q-Former's weights, embeddings and learned queries at init (transformers' name; BERT's 0.02 suits a
    # 768-wide model: a narrower one keeps its activations' scale with a larger value)
    initializer_range: float = 0.02
    # std of the cross-attention query/key projections at init: the scale of the first attention logits over image
    # tokens (near-uniform attention at small values; a larger value makes cross-attention selective from the start)
    cross_attention_init_std: float = 0.02

    def validate(self) -> None:
        _check_positive("qformer_config", hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                        num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
                        query_length=self.query_length, cross_attention_freq=self.cross_attention_freq,
                        vocab_size=self.vocab_size, max_position_embeddings=self.max_position_embeddings)
        _check_divides("qformer_config", self.hidden_size, self.num_attention_heads)
        for name in ("bos_token_id", "pad_token_id", "sep_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ConfigError(f"qformer_config.{name}={value} is outside the vocabulary (vocab_size={self.vocab_size})")

    def has_cross_attention(self, layer_index: int) -> bool:
        return layer_index % self.cross_attention_freq == 0


def _check_seq_length(seq_length: int | None, query_length: int, max_txt_len: int) -> None:
    """The LLM reads the queries and the caption as one sequence: it must hold both."""
    if seq_length is not None and seq_length < query_length + max_txt_len:
        raise ConfigError(
            f"text_config.seq_length={seq_length} is shorter than qformer_config.query_length={query_length} + "
            f"max_txt_len={max_txt_len} = {query_length + max_txt_len}"
        )


@dataclass
class Blip2Config(ConfigBase):
    """The whole BLIP-2 model: image encoder, Q-Former and (stage 2) the language model's config.

    ``text_config`` is None in stage 1. In stage 2 it is a dict: the LLM's transformers config keys plus
    ``checkpoint_name_or_path`` (a local LLM folder) and ``seq_length``.
    """

    vision_config: ViTConfig = field(default_factory=ViTConfig)
    qformer_config: QformerConfig = field(default_factory=QformerConfig)
    text_config: dict[str, Any] | None = None
    embed_dim: int = 256  # width of the ITC features (vision_proj / text_proj)
    max_txt_len: int = 32
    freeze_vision: bool = True
    freeze_text: bool = True
    prompt: str = ""
    prompt_length: int = 0
    checkpoint_name_or_path: str | None = None
    compute_dtype: str = "bfloat16"  # autocast dtype on accelerators; CPU runs in float32

    nested: ClassVar[dict[str, type]] = {"vision_config": ViTConfig, "qformer_config": QformerConfig}

    def validate(self) -> None:
        _check_positive("model_config", embed_dim=self.embed_dim, max_txt_len=self.max_txt_len)
        if self.compute_dtype not in _DTYPES:
            raise ConfigError(f"compute_dtype={self.compute_dtype!r} must be one of {', '.join(_DTYPES)}")
        if self.prompt_length < 0:
            raise ConfigError(f"prompt_length={self.prompt_length} must be >= 0")
        if self.max_txt_len > self.qformer_config.max_position_embeddings:
            raise ConfigError(
                f"max_txt_len={self.max_txt_len} exceeds qformer_config.max_position_embeddings="
                f"{self.qformer_config.max_position_embeddings}"
            )
        if self.text_config is not None and not isinstance(self.text_config, dict):
            raise ConfigError(f"text_config must be a mapping or null, got {type(self.text_config).__name__}")
        if self.text_config is not None:
            _check_seq_length(self.text_config.get("seq_length"), self.qformer_config.query_length, self.max_txt_len)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike) -> "Blip2Config":
        """A preset name (see ``show_support_list``), one of our folders, or a Hugging Face BLIP-2 folder."""
        source = registry.resolve(name_or_path)
        if source.preset is not None:
            return cls.from_dict(source.preset.config_dict())
        path = source.path
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is a file: a config is read from a preset name or a model folder")
        if (path / "config.yaml").is_file():
            return cls.from_yaml(path / "config.yaml")
        if (path / "config.json").is_file():
            return config_from_hf_folder(path)
        raise FileNotFoundError(f"{path} has neither config.yaml (blip2) nor config.json (Hugging Face)")

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``config.yaml`` atomically; a folder holding files blip2 did not write is refused unless
        ``overwrite`` (which keeps those files)."""
        directory = files.prepare_output_folder(directory, overwrite)
        files.write_files(directory, {"config.yaml": self.to_yaml})


# --- transformers' BLIP-2 config.json ------------------------------------------------------------------------------
BERT_VOCAB_SIZE = 30522  # bert-base-uncased; LAVIS appends [DEC] as id 30522
BERT_SEP_ID = 102


def _square(value: Any, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{key}={list(value)}: only square images and patches are supported")
        value = value[0]
    return int(value)


def _check_gelu(section: str, hidden_act: str) -> None:
    if hidden_act != "gelu":
        raise ConfigError(f"{section}.hidden_act={hidden_act!r}: only 'gelu' (exact) is supported")


def _special_ids(vocab_size: int) -> tuple[int, int]:
    """([DEC], [SEP]) ids: BERT's for the real vocabulary, otherwise the last ids of a small test vocabulary."""
    if vocab_size > BERT_VOCAB_SIZE:
        return BERT_VOCAB_SIZE, BERT_SEP_ID
    return vocab_size - 1, min(BERT_SEP_ID, vocab_size - 2)


def _vit_from_hf(vision: Any) -> ViTConfig:
    _check_gelu("vision_config", vision.hidden_act)
    return ViTConfig(
        image_size=_square(vision.image_size, "image_size"),
        patch_size=_square(vision.patch_size, "patch_size"),
        hidden_size=vision.hidden_size,
        num_hidden_layers=vision.num_hidden_layers,
        num_attention_heads=vision.num_attention_heads,
        intermediate_size=vision.intermediate_size,
        layer_norm_eps=vision.layer_norm_eps,
        ln_vision_eps=vision.layer_norm_eps,  # ln_vision is HF's post_layernorm, built with this eps
        qkv_bias=vision.qkv_bias,
    )


def _qformer_from_hf(qformer: Any, query_length: int) -> QformerConfig:
    _check_gelu("qformer_config", qformer.hidden_act)
    vocab_size = qformer.vocab_size
    if not qformer.use_qformer_text_input and vocab_size == BERT_VOCAB_SIZE:
        vocab_size += 1  # the text parts are not in the file: size them as LAVIS does, with [DEC]
    bos_token_id, sep_token_id = _special_ids(vocab_size)
    return QformerConfig(
        hidden_size=qformer.hidden_size,
        num_hidden_layers=qformer.num_hidden_layers,
        num_attention_heads=qformer.num_attention_heads,
        intermediate_size=qformer.intermediate_size,
        query_length=query_length,
        cross_attention_freq=qformer.cross_attention_frequency,
        vocab_size=vocab_size,
        max_position_embeddings=qformer.max_position_embeddings,
        layer_norm_eps=qformer.layer_norm_eps,
        bos_token_id=bos_token_id,
        pad_token_id=qformer.pad_token_id or 0,
        sep_token_id=sep_token_id,
        hidden_dropout_prob=qformer.hidden_dropout_prob,
        attention_probs_dropout_prob=qformer.attention_probs_dropout_prob,
        initializer_range=qformer.initializer_range,
    )


def config_from_hf_folder(path: str | Path) -> Blip2Config:
    """Translate a transformers BLIP-2 ``config.json`` into a ``Blip2Config``."""
    from transformers import Blip2Config as HFBlip2Config

    hf = HFBlip2Config.from_pretrained(str(path))
    qformer = hf.qformer_config
    return Blip2Config(
        vision_config=_vit_from_hf(hf.vision_config),
        qformer_config=_qformer_from_hf(qformer, hf.num_query_tokens),
        # a generation checkpoint keeps its LLM config for stage 2; a retrieval checkpoint has no LLM
        text_config=None if qformer.use_qformer_text_input else hf.text_config.to_dict(),
        embed_dim=hf.image_text_hidden_size,
        max_txt_len=min(32, qformer.max_position_embeddings),
    )


def set_by_path(config: Any, dotted: str, raw_value: str) -> None:
    """Apply a ``--set a.b.c=value`` override to nested dataclasses/dicts; the path must already exist.

    Values are not validated here: several overrides may only make sense together (``hidden_size`` and
    ``num_attention_heads``), so apply them all, then call ``validate_tree`` once."""
    parts = dotted.split(".")
    target = config
    for depth, part in enumerate(parts[:-1]):
        target = _child(target, part, ".".join(parts[: depth + 1]))
    last = parts[-1]
    current = _child(target, last, dotted)
    value = yaml.safe_load(raw_value) if isinstance(raw_value, str) else raw_value
    annotation = next((f.type for f in fields(target) if f.name == last), None) if dataclasses.is_dataclass(target) \
        else None
    value = coerce_number(dotted, value, current, annotation)
    if isinstance(target, dict):
        target[last] = value
    else:
        setattr(target, last, value)


def validate_tree(config: Any) -> None:
    """Run every ``__post_init__`` check of a config tree, innermost sections first, so a value that only fits
    with its neighbours (after all overrides) is judged once, with the same one-line ``ConfigError``."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    for f in fields(config):
        validate_tree(getattr(config, f.name))
    post_init = getattr(config, "__post_init__", None)
    if post_init is not None:
        post_init()


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, dict):
        if key not in node:
            raise ConfigError(f"--set {path}: no such key; valid keys here: {', '.join(map(str, node))}")
        return node[key]
    if dataclasses.is_dataclass(node):
        names = [f.name for f in fields(node)]
        if key not in names:
            raise ConfigError(f"--set {path}: no such key; valid keys here: {', '.join(names)}")
        return getattr(node, key)
    raise ConfigError(f"--set {path}: {type(node).__name__} has no keys")
