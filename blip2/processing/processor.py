"""Blip2Processor: the image processor and the Q-Former tokenizer behind one call; Blip2GenerationProcessor: the
image processor and the LLM tokenizer (stage 2)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip2 import files, registry
from blip2.config import Blip2Config
from blip2.processing.image import PREPROCESSOR_CONFIG, Blip2ImageProcessor, ImageInput
from blip2.processing.text import clean_caption
from blip2.processing.tokenizer import load_tokenizer

VOCAB_FILE = "vocab.txt"


class Blip2Processor:
    """Images to ``pixel_values``; captions to cleaned, tokenized ``input_ids`` and ``attention_mask``."""

    def __init__(
        self,
        image_processor: Blip2ImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 32,
        padding: str = "max_length",
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = padding

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        train: bool = False,
        max_length: int | None = None,
        padding: str | None = None,
        clean: bool = True,
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B, 3, S, S) and/or ``input_ids``, ``attention_mask`` (B, L); ``clean`` runs clean_caption."""
        if images is None and text is None:
            raise ValueError("give images, text or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out.update(self.image_processor(images, train=train))
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("no text given")
            if clean:
                texts = [clean_caption(t) for t in texts]
            # numpy then from_numpy: torch.tensor on nested lists is the slowest step for large batches
            encoded = self.tokenizer(texts, padding=padding or self.padding, truncation=True,
                                     max_length=max_length or self.max_length, return_tensors="np",
                                     return_token_type_ids=False)
            out["input_ids"] = torch.from_numpy(encoded["input_ids"])
            out["attention_mask"] = torch.from_numpy(encoded["attention_mask"])
        return out

    def batch_decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts without [DEC], [CLS], [SEP] and [PAD] ([UNK] stays visible)."""
        tok = self.tokenizer
        drop = {tok.bos_token_id, tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
        rows = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids
        kept = [[i for i in row if i not in drop] for row in rows]
        return [text.strip() for text in tok.batch_decode(kept)]

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, seed: int | None = None) -> "Blip2Processor":
        """A preset name, or a folder (config.yaml and/or preprocessor_config.json, optional vocab.txt)."""
        source = registry.resolve(name_or_path)
        image_processor = Blip2ImageProcessor.from_pretrained(name_or_path, seed=seed)
        tokenizer = load_tokenizer(source.saved_file(VOCAB_FILE))  # None: bert-base-uncased's, shipped
        if source.preset is not None or source.saved_file("config.yaml") is not None:
            max_length = Blip2Config.from_pretrained(name_or_path).max_txt_len
        else:
            max_length = Blip2Config.max_txt_len
        return cls(image_processor, tokenizer, max_length)

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer's base vocabulary as ``vocab.txt``, each atomically;
        a folder holding files blip2 did not write is refused unless ``overwrite`` (which keeps those files)."""
        vocab = self.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("the tokenizer's vocabulary ids are not contiguous from 0; cannot write vocab.txt")
        directory = files.prepare_output_folder(directory, overwrite)
        files.write_files(directory, {
            PREPROCESSOR_CONFIG: partial(_write_json, self.image_processor.to_dict()),
            VOCAB_FILE: partial(_write_text, "".join(f"{token}\n" for token in tokens)),
        })


class Blip2GenerationProcessor:
    """Stage 2: images to ``pixel_values``; prompts to left-padded LLM ``input_ids`` and ``attention_mask``;
    generated tokens back to text.

    A prompt is tokenized as ``[the tokenizer's leading special tokens][prompt tokens]``: BOS for Llama and OPT (as
    transformers' BLIP-2 processor gives it, and as ``Blip2ImageToTextGeneration.generate`` starts without a prompt),
    nothing for Baichuan-7B (as in the seed). A trailing EOS the tokenizer may append is never added: a prompt is
    continued, not ended. Prompts are neither cleaned nor truncated: the model refuses one that does not fit.
    """

    def __init__(self, image_processor: Blip2ImageProcessor, tokenizer: PreTrainedTokenizerBase) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.prefix_ids = _leading_special_ids(tokenizer)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput] | None = None, text: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` (B, 3, S, S) and/or left-padded ``input_ids``, ``attention_mask`` (B, L)."""
        if images is None and text is None:
            raise ValueError("give images, text or both")
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out.update(self.image_processor(images))
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not texts:
                raise ValueError("no text given")
            out.update(self.pad(self.encode(texts)))
        return out

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt: the leading special tokens, then the prompt's own tokens."""
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise TypeError("prompts must be strings")
        plain = self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        return [self.prefix_ids + ids for ids in plain]

    def pad(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-pad ``rows`` to the longest: the generated tokens then follow every prompt's last token directly."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                input_ids[index, length - len(row):] = torch.tensor(row, dtype=torch.long)
                attention_mask[index, length - len(row):] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text the new tokens add after the prompt, spacing included, as the tokenizer decodes the whole
        sequence: " a dog" after "a photo of", "ture" after "a pic" (special tokens and padding skipped)."""
        whole = self.tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
        head = self.tokenizer.decode(list(prompt_ids), skip_special_tokens=True)
        if whole.startswith(head):
            return whole[len(head):]
        return " " + self.tokenizer.decode(list(new_ids), skip_special_tokens=True)  # a merge across the seam

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "Blip2GenerationProcessor":
        """A folder with ``preprocessor_config.json`` (or our ``config.yaml``) and the LLM's tokenizer files."""
        from blip2.processing.llm_tokenizer import load_llm_tokenizer  # transformers' tokenizer classes, loaded for stage 2 only

        return cls(Blip2ImageProcessor.from_pretrained(folder), load_llm_tokenizer(folder))

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer's own files (e.g. beside a model's config.yaml, so
        ``pipeline("image_to_text_generation", model=directory)`` finds both), each atomically; a folder holding
        files blip2 did not write is refused unless ``overwrite`` (which keeps those files)."""
        directory = files.prepare_output_folder(directory, overwrite)
        files.write_files(directory, {PREPROCESSOR_CONFIG: partial(_write_json, self.image_processor.to_dict())})
        files.write_folder_files(directory, lambda staging: self.tokenizer.save_pretrained(str(staging)))


def _write_json(data: dict, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)


def _write_text(text: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _leading_special_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts before a text's own tokens (e.g. ``[BOS]``), found by encoding a probe word."""
    probe = "a"
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []
