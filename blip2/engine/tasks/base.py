"""The task interface the Trainer drives: build a training batch, compute a training step, evaluate, predict, save."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader


def eval_loader(dataset, collate_fn, batch_size: int, num_workers: int) -> DataLoader:
    """The evaluation order: every item once, in order."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)


class Task:
    """One task: ``name`` is what ``trainer.type`` names; ``trains`` whether ``Trainer.train`` runs it.

    ``uses_blip2_model`` False: the model is a plain transformers model (``causal_lm_pretrain``), so the Trainer
    builds no Q-Former tokenizer or image processor for it (the tokenizer is given to the Trainer)."""

    name = ""
    trains = False
    uses_blip2_model = True

    def train_collator(self, trainer, dataset_cfg):
        """Training items -> batches: images and Q-Former tokens (stage 1)."""
        from blip2.data import ImageTextCollator

        return ImageTextCollator(trainer.image_processor, trainer.tokenizer,
                                 max_length=dataset_cfg.tokenizer.max_length, train=dataset_cfg.augment,
                                 padding=dataset_cfg.tokenizer.padding)

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"task {self.name!r} does not train")

    def evaluate(self, trainer) -> dict[str, float]:
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def predict(self, trainer, input_data, **kwargs) -> list:
        raise NotImplementedError(f"task {self.name!r} has no prediction")

    def save_model(self, trainer, model, directory) -> None:
        """The model plus what reads its inputs (image settings, vocabulary), so ``pipeline(model=directory)`` and
        ``from_pretrained(directory)`` need nothing else."""
        from blip2.processing import Blip2Processor

        model.save_pretrained(directory)
        if not trainer.stage2:  # a stage-2 folder refers to its LLM's folder, which holds the tokenizer
            Blip2Processor(trainer.image_processor, trainer.tokenizer, trainer.text_max_length).save_pretrained(
                directory)
