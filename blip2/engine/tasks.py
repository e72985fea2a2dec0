"""Tasks plug into the Trainer: each builds its data, computes a training step, evaluates, or predicts.

Names are the seed's: ``contrastive_language_image_pretrain`` (stage-1 training; its evaluation is retrieval),
``image_to_text_retrieval`` and ``zero_shot_image_classification`` here; the stage-2 tasks
(``image_to_text_generation`` and its training) are in ``generation_tasks.py``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from blip2.engine import distributed
from blip2.engine.metrics import retrieval_metrics, topk_accuracy
from blip2.engine.retrieval import rerank_scores

DEFAULT_TEMPLATE = "This is a photo of {}."


def _loader(dataset, collate_fn, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)


def _tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    tokens = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                       return_tensors="pt")
    return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], max_length: int, device: torch.device,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All texts -> normalized [CLS] features (N, E), ids and masks (N, L)."""
    feats, ids, masks = [], [], []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = _tokenize(tokenizer, texts[start : start + batch_size], max_length, device)
        feats.append(model.get_text_features(input_ids, attention_mask).float())
        ids.append(input_ids)
        masks.append(attention_mask)
    return torch.cat(feats), torch.cat(ids), torch.cat(masks)


@torch.no_grad()
def encode_images(model, loader: DataLoader, device: torch.device, keep_embeds: bool = True, autocast=None,
                  progress: bool = False):
    """All images -> query features (N, Q, E), ln_vision(ViT) outputs (N, T, D) for ITM, labels if any."""
    feats, embeds, labels = [], [], []
    for batch in tqdm(loader, desc="encode images", disable=not progress, leave=False):
        if batch is None:
            continue
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        with autocast():
            image_embeds = model.encode_image(pixel_values)
            query_hidden = model.query_forward(image_embeds).last_hidden_state
            feats.append(model.image_feats(query_hidden).float())
        if keep_embeds:
            embeds.append(image_embeds)
        if "labels" in batch:
            labels.append(batch["labels"])
    return torch.cat(feats), (torch.cat(embeds) if keep_embeds else None), (torch.cat(labels) if labels else None)


class Task:
    name = ""
    trains = False

    def train_collator(self, trainer, dataset_cfg):
        """Training items -> batches: images and Q-Former tokens (stage 1)."""
        from blip2.data import ImageTextCollator

        return ImageTextCollator(trainer.image_processor, trainer.tokenizer, max_length=dataset_cfg.tokenizer.max_length,
                                 train=dataset_cfg.augment, padding=dataset_cfg.tokenizer.padding)

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"task {self.name!r} does not train")

    def evaluate(self, trainer) -> dict[str, float]:
        raise NotImplementedError(f"task {self.name!r} has no evaluation")

    def predict(self, trainer, input_data, **kwargs) -> list:
        raise NotImplementedError(f"task {self.name!r} has no prediction")


class RetrievalTask(Task):
    name = "image_to_text_retrieval"

    def evaluate(self, trainer) -> dict[str, float]:
        dataset_cfg = trainer.config.eval_dataset
        dataset = trainer.eval_dataset
        if dataset is None or not hasattr(dataset, "img2txt"):
            raise ValueError(f"{self.name} needs an eval_dataset with stage 'eval' (captions per image)")
        model = distributed.unwrap(trainer.model).eval()
        loader = _loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size,
                         dataset_cfg.num_workers if dataset_cfg else 0)
        text_length = dataset_cfg.tokenizer.max_length if dataset_cfg else 35
        image_feats, image_embeds, _ = encode_images(model, loader, trainer.device, autocast=trainer.autocast,
                                                     progress=trainer.is_main)
        text_feats, text_ids, text_mask = encode_texts(model, trainer.tokenizer, dataset.texts, text_length,
                                                       trainer.device)
        sims = model.similarity(image_feats, text_feats)  # (N_img, N_txt)

        def itm_fn(images, ids, masks):
            with trainer.autocast():
                return model.itm_logits_from_embeds(images, ids, masks)

        k_test = dataset_cfg.k_test if dataset_cfg else 128
        add_itm = dataset_cfg.add_extra_itm_score if dataset_cfg else True
        score_i2t, score_t2i = rerank_scores(itm_fn, sims, image_embeds, text_ids, text_mask, k_test,
                                             batch_size=trainer.eval_batch_size * 4, add_itm=add_itm,
                                             progress=trainer.is_main)
        return retrieval_metrics(score_i2t.cpu(), score_t2i.cpu(), dataset.img2txt, dataset.txt2img)

    def predict(self, trainer, input_data, candidate_texts: Sequence[str] | None = None, top_k: int | None = 3,
                num_beams: int = 3, max_length: int = 30, min_length: int = 1, **_) -> list[dict[str, Any]]:
        """For each image: a caption from the Q-Former's LM head and the best-matching candidate texts (ITC
        similarity; the candidates default to the eval set's captions)."""
        model = distributed.unwrap(trainer.model).eval()
        images = list(input_data) if isinstance(input_data, (list, tuple)) else [input_data]
        pixel_values = trainer.image_processor(images)["pixel_values"].to(trainer.device)
        with torch.no_grad(), trainer.autocast():
            caption_ids = model.generate(pixel_values, num_beams=num_beams, max_length=max_length,
                                         min_length=min_length)
            image_feats = model.get_image_features(pixel_values).float()
        captions = [text.strip() for text in trainer.tokenizer.batch_decode(caption_ids, skip_special_tokens=True)]
        eval_texts = getattr(trainer.eval_dataset, "texts", None) if trainer.has_eval_data() else None
        texts = list(candidate_texts or eval_texts or [])
        results = [{"image": str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}",
                    "caption": caption} for index, (image, caption) in enumerate(zip(images, captions))]
        if texts and top_k:
            text_feats = encode_texts(model, trainer.tokenizer, texts, trainer.text_max_length, trainer.device)[0]
            scores, order = model.similarity(image_feats, text_feats).topk(min(top_k, len(texts)), dim=1)
            for result, row_scores, row_order in zip(results, scores.tolist(), order.tolist()):
                result["retrieved"] = [{"text": texts[i], "score": s} for s, i in zip(row_scores, row_order)]
        return results


class PretrainTask(RetrievalTask):
    """Stage-1 training; evaluation (when an eval set is given) is image-text retrieval, as LAVIS validates."""

    name = "contrastive_language_image_pretrain"
    trains = True

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        output = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], gather=gather)
        return {"loss": output.loss, "loss_itc": output.loss_itc, "loss_itm": output.loss_itm,
                "loss_lm": output.loss_lm}


@torch.no_grad()
def label_features(model, tokenizer, labels: Sequence[str], templates: Sequence[str] | str, max_length: int,
                   device: torch.device) -> torch.Tensor:
    """One normalized text feature per label (C, E); several templates are averaged (prompt ensembling)."""
    templates = [templates] if isinstance(templates, str) else list(templates)
    per_template = []
    for template in templates:
        texts = [template.format(label) if "{}" in template else f"{template} {label}" for label in labels]
        per_template.append(encode_texts(model, tokenizer, texts, max_length, device)[0])
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def zero_shot_logits(model, image_feats: torch.Tensor, label_feats: torch.Tensor) -> torch.Tensor:
    """Max-over-queries cosine divided by the learned temperature: (N, Q, E) x (C, E) -> (N, C)."""
    return model.similarity(image_feats, label_feats) / model.temp.float()


def ranked_labels(probs: torch.Tensor, labels: Sequence[str], top_k: int | None) -> list[list[dict[str, Any]]]:
    out = []
    for row in probs.tolist():
        order = sorted(range(len(labels)), key=lambda i: row[i], reverse=True)[: top_k or len(labels)]
        out.append([{"score": row[i], "label": labels[i]} for i in order])
    return out


class ZeroShotClassificationTask(Task):
    name = "zero_shot_image_classification"

    def _labels_and_template(self, trainer, dataset=None, candidate_labels=None, hypothesis_template=None,
                             build_dataset=None):
        """Labels: given to the call, else to the Trainer (``candidate_labels=``), else ``eval_dataset.
        candidate_labels``, else the eval set's class names (``dataset``, or the one ``build_dataset()`` returns:
        built only when nothing else names the labels)."""
        cfg = trainer.config.eval_dataset
        options = getattr(trainer, "task_options", {})
        labels = candidate_labels or options.get("candidate_labels") or (cfg.candidate_labels if cfg else None)
        if not labels and dataset is None and build_dataset is not None:
            try:
                dataset = build_dataset()
            except FileNotFoundError as error:
                raise FileNotFoundError(f"{self.name} needs candidate_labels, and the eval data set that would name "
                                        f"them is not there ({error}): give --eval_dataset_dir or candidate_labels") \
                    from None
        if not labels and dataset is not None:
            labels = getattr(dataset, "classes", None)
        if not labels:
            raise ValueError(f"{self.name} needs candidate_labels (Trainer(candidate_labels=[...]), "
                             "eval_dataset.candidate_labels, or an eval data set with classes: --eval_dataset_dir)")
        template = (hypothesis_template or options.get("hypothesis_template")
                    or (cfg.data_loader.hypothesis_template if cfg else None) or DEFAULT_TEMPLATE)
        return list(labels), template

    def evaluate(self, trainer, hypothesis_template=None) -> dict[str, float]:
        dataset = trainer.eval_dataset
        if dataset is None:
            raise ValueError(f"{self.name} evaluation needs an eval_dataset with labels")
        model = distributed.unwrap(trainer.model).eval()
        labels, template = self._labels_and_template(trainer, dataset, hypothesis_template=hypothesis_template)
        label_feats = label_features(model, trainer.tokenizer, labels, template, trainer.text_max_length,
                                     trainer.device)
        loader = _loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size,
                         trainer.config.eval_dataset.num_workers if trainer.config.eval_dataset else 0)
        image_feats, _, targets = encode_images(model, loader, trainer.device, keep_embeds=False,
                                                autocast=trainer.autocast, progress=trainer.is_main)
        logits = zero_shot_logits(model, image_feats, label_feats).cpu()
        return topk_accuracy(logits, targets, ks=(1, 5))

    def predict(self, trainer, input_data, candidate_labels=None, hypothesis_template=None, top_k=None, **_):
        model = distributed.unwrap(trainer.model).eval()
        labels, template = self._labels_and_template(trainer, None, candidate_labels, hypothesis_template,
                                                     build_dataset=lambda: trainer.eval_dataset)
        label_feats = label_features(model, trainer.tokenizer, labels, template, trainer.text_max_length,
                                     trainer.device)
        images = input_data if isinstance(input_data, (list, tuple)) else [input_data]
        pixel_values = trainer.image_processor(list(images))["pixel_values"].to(trainer.device)
        with torch.no_grad(), trainer.autocast():
            image_feats = model.get_image_features(pixel_values).float()
        probs = zero_shot_logits(model, image_feats, label_feats).softmax(-1).cpu()
        return ranked_labels(probs, labels, top_k)


def _all_tasks() -> dict[str, type[Task]]:
    from blip2.engine.generation_tasks import GenerationPretrainTask, ImageToTextGenerationTask

    tasks = (PretrainTask, RetrievalTask, ZeroShotClassificationTask, GenerationPretrainTask,
             ImageToTextGenerationTask)
    return {task.name: task for task in tasks}


def get_task(name: str, stage2: bool = False) -> Task:
    """The task called ``name``; for a stage-2 model the seed's ``contrastive_language_image_pretrain`` means
    stage-2 training (``image_to_text_generation_pretrain``)."""
    tasks = _all_tasks()
    if stage2 and name == PretrainTask.name:
        name = "image_to_text_generation_pretrain"
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(tasks)}")
    return tasks[name]()
