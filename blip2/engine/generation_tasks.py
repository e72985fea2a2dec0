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


def generation_pipeline(trainer, hypothesis_template: str | None = None):
    """The ``image_to_text_generation`` pipeline over the trainer's model, image processor and LLM tokenizer."""
    from blip2.pipelines import IDENTITY_TEMPLATE, ImageToTextGenerationPipeline
    from blip2.processing import Blip2GenerationProcessor

    cfg = trainer.config.eval_dataset
    template = (hypothesis_template or getattr(trainer, "task_options", {}).get("hypothesis_template")
                or (cfg.data_loader.hypothesis_template if cfg else None) or IDENTITY_TEMPLATE)
    model = distributed.unwrap(trainer.model).eval()
    processor = Blip2GenerationProcessor(trainer.image_processor, trainer.tokenizer)
    return ImageToTextGenerationPipeline(model, processor, trainer.device, hypothesis_template=template,
                                         batch_size=trainer.eval_batch_size)


class ImageToTextGenerationTask(Task):
    """Captions or answers from a stage-2 model; evaluation scores captions of the eval set (COCO metrics)."""

    name = "image_to_text_generation"

    def evaluate(self, trainer, hypothesis_template: str | None = None, **generation_kwargs) -> dict[str, float]:
        """Caption every eval image (prompt: the training prompt, through the template) and score against its
        captions; the captions are written to ``<output_dir>/captions.json``."""
        dataset = trainer.eval_dataset
        if dataset is None or not hasattr(dataset, "img2txt"):
            raise ValueError(f"{self.name} evaluation needs an eval_dataset with stage 'eval' (captions per image)")
        cfg = trainer.config.eval_dataset
        pipe = generation_pipeline(trainer, hypothesis_template)
        prompt = cfg.text_transforms.prompt or None  # None: the model's own prompt (model_config.prompt), if any
        loader = _loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size, cfg.num_workers)
        settings = {**CAPTION_SETTINGS, **generation_kwargs}
        candidates: dict[int, str] = {}
        for batch in tqdm(loader, desc="caption", disable=not trainer.is_main, leave=False):
            if batch is None:
                continue
            outputs = pipe.generate_from_pixels(batch["pixel_values"].to(trainer.device), prompt,
                                                return_full_text=False, **settings)
            candidates.update(zip(batch["indices"].tolist(), (output["generated_text"] for output in outputs)))
        references = {i: [dataset.texts[j] for j in dataset.img2txt[i]] for i in candidates}
        if trainer.is_main:
            trainer.output_dir.mkdir(parents=True, exist_ok=True)
            paths = getattr(dataset, "image_paths", None)
            rows = [{"image_index": i, **({"image": str(paths[i])} if paths else {}), "caption": text,
                     "references": references[i]} for i, text in sorted(candidates.items())]
            (trainer.output_dir / "captions.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return caption_metrics(references, candidates)

    def predict(self, trainer, input_data, prompt: str | Sequence[str] | None = None,
                hypothesis_template: str | None = None, **kwargs) -> list[dict[str, Any]]:
        """For each image ``{"image", "generated_text"}`` through the ``image_to_text_generation`` pipeline: the text
        starts with the prompt unless ``return_full_text=False``; ``prompt`` is one string or one per image (a
        question, with ``hypothesis_template="Question: {} Answer:"``); other keywords are generation settings."""
        images = list(input_data) if isinstance(input_data, (list, tuple)) else [input_data]
        outputs = generation_pipeline(trainer, hypothesis_template)(images, prompt=prompt, **kwargs)
        return [{"image": str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}", **output}
                for index, (image, output) in enumerate(zip(images, outputs))]


class GenerationPretrainTask(ImageToTextGenerationTask):
    """Stage-2 training: the LM loss of ``prompt caption`` after the projected queries; the LLM stays frozen.
    Evaluation and prediction are ``image_to_text_generation``'s."""

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
