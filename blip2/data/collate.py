"""Batch collation: image transforms and tokenization run here, inside the DataLoader workers.

Items that a data set skipped (None: an unreadable image) are dropped and counted in ``num_skipped_in_batch``.
A batch whose every item was skipped collates to None; the trainer skips such a batch.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

Item = dict[str, Any] | None
ImageProcessor = Callable[..., dict[str, torch.Tensor]]  # (images, train=...) -> {"pixel_values": (B, 3, S, S)}


class ImageTextCollator:
    """Items ``dict(image, caption, index[, image_id])`` -> pixel_values, input_ids, attention_mask, indices (and
    image_ids when the items have them)."""

    def __init__(self, image_processor: ImageProcessor, tokenizer: Callable[..., Any], max_length: int = 32,
                 train: bool = True, padding: str = "max_length") -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = train
        self.padding = padding

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor | int] | None:
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        seeds = [item["seed"] for item in kept] if "seed" in kept[0] else None  # per-item augmentation seeds
        pixel_values = self.image_processor([item["image"] for item in kept], train=self.train,
                                            seeds=seeds)["pixel_values"]
        tokens = self.tokenizer([item["caption"] for item in kept], padding=self.padding, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        batch = {
            "pixel_values": pixel_values,  # (B, 3, S, S)
            "input_ids": tokens["input_ids"],  # (B, L)
            "attention_mask": tokens["attention_mask"],  # (B, L)
            "indices": torch.tensor([item["index"] for item in kept]),  # (B,)
            "num_skipped_in_batch": len(items) - len(kept),
        }
        if all("image_id" in item for item in kept):
            batch["image_ids"] = torch.tensor([item["image_id"] for item in kept])  # (B,)
        return batch


class ImageCollator:
    """Items ``dict(image, index[, label])`` -> pixel_values, indices (and labels when the items have them)."""

    def __init__(self, image_processor: ImageProcessor, train: bool = False) -> None:
        self.image_processor = image_processor
        self.train = train

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor | int] | None:
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        batch: dict[str, torch.Tensor | int] = {
            "pixel_values": self.image_processor([item["image"] for item in kept], train=self.train)["pixel_values"],
            "indices": torch.tensor([item["index"] for item in kept]),  # (B,)
            "num_skipped_in_batch": len(items) - len(kept),
        }
        if "label" in kept[0]:
            batch["labels"] = torch.tensor([item["label"] for item in kept])  # (B,)
        return batch


class ImageCaptionLMCollator:
    """Stage-2 training items ``dict(image, caption, index)`` -> pixel_values, LLM input_ids, attention_mask, labels.

    Each text is ``prompt caption`` (the data set already put the prompt in front) tokenized by the LLM's tokenizer
    (its BOS, if it adds one), then EOS, right-padded. ``labels`` are the ids with padding and the prompt's tokens
    (BOS included) set to -100, as LAVIS masks ``prompt_length`` tokens: the loss is on the caption and its EOS.
    """

    def __init__(self, image_processor: ImageProcessor, tokenizer: Callable[..., Any], max_length: int = 32,
                 prompt: str = "", train: bool = True) -> None:
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("the LLM tokenizer needs an eos and a pad token for stage-2 training")
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train = train
        self.prompt_length = len(tokenizer(prompt)["input_ids"])  # with "" just the BOS, if the tokenizer adds one

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor | int] | None:
        kept = [item for item in items if item is not None]
        if not kept:
            return None
        seeds = [item["seed"] for item in kept] if "seed" in kept[0] else None
        pixel_values = self.image_processor([item["image"] for item in kept], train=self.train,
                                            seeds=seeds)["pixel_values"]
        encoded = self.tokenizer([item["caption"] for item in kept], truncation=True,
                                 max_length=self.max_length - 1)["input_ids"]
        ids = [list(row) + [self.tokenizer.eos_token_id] for row in encoded]
        rows = [(row, ([-100] * self.prompt_length + row[self.prompt_length:])[: len(row)]) for row in ids]
        input_ids, attention_mask, labels = pad_token_rows(rows, self.tokenizer.pad_token_id)
        return {
            "pixel_values": pixel_values,  # (B, 3, S, S)
            "input_ids": input_ids,  # (B, L) right-padded
            "attention_mask": attention_mask,  # (B, L)
            "labels": labels,  # (B, L)
            "indices": torch.tensor([item["index"] for item in kept]),
            "num_skipped_in_batch": len(items) - len(kept),
        }


def pad_token_rows(rows: Sequence[tuple[list[int], list[int]]],
                   pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad (ids, labels) rows into input_ids, attention_mask and labels (B, L); padding is never a target."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, : len(targets)] = torch.tensor(targets)
    return input_ids, attention_mask, labels
