"""Blip2Processor: the image processor and the Q-Former tokenizer behind one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip2 import registry
from blip2.config import Blip2Config
from blip2.processing.image import Blip2ImageProcessor, ImageInput
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
        name = str(name_or_path)
        image_processor = Blip2ImageProcessor.from_pretrained(name, seed=seed)
        if name in registry.PRESETS:
            return cls(image_processor, load_tokenizer(), registry.get_preset(name).config().max_txt_len)
        path = Path(name)
        vocab = path / VOCAB_FILE
        tokenizer = load_tokenizer(vocab if vocab.is_file() else None)
        config_file = path / "config.yaml"
        max_length = Blip2Config.from_yaml(config_file).max_txt_len if config_file.is_file() else 32
        return cls(image_processor, tokenizer, max_length)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``preprocessor_config.json`` and the tokenizer's base vocabulary as ``vocab.txt``."""
        self.image_processor.save_pretrained(directory)
        vocab = self.tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
        tokens = sorted(vocab, key=vocab.__getitem__)
        if [vocab[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("the tokenizer's vocabulary ids are not contiguous from 0; cannot write vocab.txt")
        with open(Path(directory) / VOCAB_FILE, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{token}\n" for token in tokens))
