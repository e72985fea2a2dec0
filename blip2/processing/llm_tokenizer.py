"""The tokenizer of a stage-2 LLM folder, read without remote code: transformers' own classes where the folder
names one, else a sentencepiece ``tokenizer.model`` (Llama, Baichuan-7B) or byte-level BPE files (GPT-2, OPT).

The folder's weights are read by ``blip2.weights.llm``; this module reads only its tokenizer files (and config.json,
to tell a Baichuan folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from blip2.weights.llm import CONFIG_FILE, LLMLoadError, existing_folder, is_baichuan, read_json

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json + merges.txt")


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
    folder = existing_folder(path, "tokenizer")
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
    model_config = read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    tokenizer_config_file = folder / "tokenizer_config.json"
    tokenizer_config = read_json(tokenizer_config_file) if tokenizer_config_file.is_file() else {}
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

