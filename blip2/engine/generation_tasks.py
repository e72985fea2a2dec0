"""Stage-2 tasks: training the Q-Former to prompt a frozen LLM, and image-to-text generation (captions, VQA).

``image_to_text_generation_pretrain`` is stage-2 training (the seed runs it under
``contrastive_language_image_pretrain``, which the Trainer accepts for a stage-2 model too); its evaluation, like
``image_to_text_generation``'s, captions the eval set's images and scores them against the references (BLEU, CIDEr).
``image_to_text_generation`` predicts: captions, or answers with ``hypothesis_template="Question: {} Answer:"``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from blip2.engine import distributed
from blip2.engine.caption_metrics import caption_metrics
from blip2.engine.tasks import Task, _loader

VQA_TEMPLATE = "Question: {} Answer:"
# LAVIS evaluates captions with 5 beams; the length limit is the model's (text_config.seq_length, or max_txt_len)
CAPTION_SETTINGS = {"num_beams": 5, "min_new_tokens": 1}


def apply_template(template: str | None, prompt: str | None) -> str:
    """The seed's hypothesis_template: ``template.format(prompt).strip()``; a template without ``{}`` is the prompt
    itself; no template: the prompt as given ("" for plain captioning)."""
    if not template:
        return (prompt or "").strip()
    return template.format(prompt or "").strip() if "{}" in template else template.strip()


def left_padded_prompts(tokenizer, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM tokens of ``prompts`` (BOS as the tokenizer adds it), left-padded as generation needs: (B, L) twice."""
    encoded = tokenizer(list(prompts), padding="longest", padding_side="left", return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


@torch.no_grad()
def generate_texts(model, tokenizer, pixel_values: torch.Tensor, prompts: Sequence[str], autocast=None,
                   **generation_kwargs) -> list[str]:
    """One continuation per image (without its prompt), decoded without special tokens."""
    input_ids, attention_mask = left_padded_prompts(tokenizer, prompts, pixel_values.device)
    with autocast() if autocast else torch.autocast("cpu", enabled=False):
        new_ids = model.generate(pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                                 **generation_kwargs)
    return [text.strip() for text in tokenizer.batch_decode(new_ids, skip_special_tokens=True)]


class GenerationPretrainTask(Task):
    """Stage-2 training: the LM loss of ``prompt caption`` after the projected queries; the LLM stays frozen."""

    name = "image_to_text_generation_pretrain"
    trains = True

    def train_collator(self, trainer, dataset_cfg):
        from blip2.data import ImageCaptionLMCollator

        return ImageCaptionLMCollator(trainer.image_processor, trainer.tokenizer,
                                      max_length=dataset_cfg.tokenizer.max_length,
                                      prompt=dataset_cfg.text_transforms.prompt, train=dataset_cfg.augment)

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        output = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        return {"loss": output.loss}

    def evaluate(self, trainer, **kwargs) -> dict[str, float]:
        return ImageToTextGenerationTask().evaluate(trainer, **kwargs)

    def predict(self, trainer, input_data, **kwargs) -> list:
        return ImageToTextGenerationTask().predict(trainer, input_data, **kwargs)


class ImageToTextGenerationTask(Task):
    """Captions or answers from a stage-2 model; evaluation scores captions of the eval set (COCO metrics)."""

    name = "image_to_text_generation"

    @staticmethod
    def _template(trainer, hypothesis_template: str | None) -> str | None:
        cfg = trainer.config.eval_dataset
        return hypothesis_template or (cfg.data_loader.hypothesis_template if cfg else None)

    def evaluate(self, trainer, hypothesis_template: str | None = None, **generation_kwargs) -> dict[str, float]:
        """Caption every eval image (prompt: the template, or the training prompt) and score against its captions;
        the captions are written to ``<output_dir>/captions.json``."""
        dataset = trainer.eval_dataset
        if dataset is None or not hasattr(dataset, "img2txt"):
            raise ValueError(f"{self.name} evaluation needs an eval_dataset with stage 'eval' (captions per image)")
        model = distributed.unwrap(trainer.model).eval()
        cfg = trainer.config.eval_dataset
        prompt = apply_template(self._template(trainer, hypothesis_template), cfg.text_transforms.prompt)
        loader = _loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size, cfg.num_workers)
        settings = {**CAPTION_SETTINGS, **generation_kwargs}
        candidates: dict[int, str] = {}
        for batch in tqdm(loader, desc="caption", disable=not trainer.is_main, leave=False):
            if batch is None:
                continue
            pixel_values = batch["pixel_values"].to(trainer.device)
            texts = generate_texts(model, trainer.tokenizer, pixel_values, [prompt] * len(pixel_values),
                                   autocast=trainer.autocast, **settings)
            candidates.update(zip(batch["indices"].tolist(), texts))
        references = {i: [dataset.texts[j] for j in dataset.img2txt[i]] for i in candidates}
        if trainer.is_main:
            trainer.output_dir.mkdir(parents=True, exist_ok=True)
            paths = getattr(dataset, "image_paths", None)
            rows = [{"image_index": i, **({"image": str(paths[i])} if paths else {}), "caption": text,
                     "references": references[i]} for i, text in sorted(candidates.items())]
            (trainer.output_dir / "captions.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return caption_metrics(references, candidates)

    def predict(self, trainer, input_data, prompt: str | Sequence[str] | None = None,
                hypothesis_template: str | None = None, return_full_text: bool = True, batch_size: int | None = None,
                **generation_kwargs) -> list[dict[str, Any]]:
        """For each image ``{"image", "generated_text"}``; the text starts with the prompt unless
        ``return_full_text=False``. ``prompt`` is one string or one per image (a question with the VQA template)."""
        model = distributed.unwrap(trainer.model).eval()
        images = list(input_data) if isinstance(input_data, (list, tuple)) else [input_data]
        raw = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * len(images)
        if len(raw) != len(images):
            raise ValueError(f"{len(raw)} prompts for {len(images)} images: give one prompt, or one per image")
        template = self._template(trainer, hypothesis_template)
        prompts = [apply_template(template, text) for text in raw]
        batch_size = batch_size or trainer.eval_batch_size
        results = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixel_values = trainer.image_processor(chunk)["pixel_values"].to(trainer.device)
            texts = generate_texts(model, trainer.tokenizer, pixel_values, prompts[start : start + batch_size],
                                   autocast=trainer.autocast, **generation_kwargs)
            for offset, (image, text) in enumerate(zip(chunk, texts)):
                full = f"{prompts[start + offset]} {text}".strip() if return_full_text else text
                name = str(image) if isinstance(image, (str, os.PathLike)) else f"image {start + offset}"
                results.append({"image": name, "generated_text": full})
        return results
