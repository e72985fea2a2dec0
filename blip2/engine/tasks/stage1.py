"""Stage-1 tasks: ``contrastive_language_image_pretrain`` (training; its evaluation is retrieval),
``image_text_retrieval_finetune`` (training with same-image positives),
``image_to_text_retrieval`` and ``zero_shot_image_classification``. The scoring is ``blip2.models.scoring``'s, the
same as the pipelines'; retrieval re-ranking is shared out over processes by ``blip2.engine.retrieval``."""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch

from blip2.engine import distributed, retrieval
from blip2.engine.metrics import topk_accuracy
from blip2.engine.tasks.base import Task, eval_loader
from blip2.models.scoring import encode_images, encode_texts, label_features, ranked_labels, zero_shot_logits
from blip2.processing.prompts import DEFAULT_TEMPLATE

DEFAULT_TEXT_LENGTH = 35  # retrieval texts' token length without an eval_dataset section (LAVIS max_txt_len)
DEFAULT_K_TEST = 128  # ITC candidates re-ranked by ITM without an eval_dataset section
ITM_PAIRS_PER_IMAGE = 4  # pairs per ITM call, per image of the eval batch size
CAPTION_MAX_LENGTH = 30  # Q-Former captions of predict()
TOP_K_ACCURACY = (1, 5)
TEXTS_PER_BATCH = 4  # texts per text-encoder call of retrieval, per image of the eval batch size
MAX_ROWS_PER_CHUNK = 32  # similarity rows held at once by the re-rank (32 x 25,000 x Q floats for COCO-5K)

logger = logging.getLogger("blip2")


class RetrievalTask(Task):
    name = "image_to_text_retrieval"

    def evaluate(self, trainer) -> dict[str, float]:
        dataset_cfg = trainer.config.eval_dataset
        dataset = trainer.eval_dataset
        if dataset is None or not hasattr(dataset, "img2txt"):
            raise ValueError(f"{self.name} needs an eval_dataset with stage 'eval' (captions per image)")
        model = distributed.unwrap(trainer.model).eval()
        batch_size = trainer.eval_batch_size
        collate, workers = trainer.image_collator(train=False), dataset_cfg.num_workers if dataset_cfg else 0
        text_length = dataset_cfg.tokenizer.max_length if dataset_cfg else DEFAULT_TEXT_LENGTH
        # each process encodes its own share of the images and texts; the features are gathered
        image_feats, image_embeds, images_encoded = retrieval.encode_image_share(
            model, dataset, lambda subset: eval_loader(subset, collate, batch_size, workers), batch_size,
            trainer.device, autocast=trainer.autocast, progress=trainer.is_main)
        text_feats, text_ids, text_mask, texts_encoded = retrieval.encode_text_share(
            model, trainer.tokenizer, dataset.texts, text_length, trainer.device, batch_size * TEXTS_PER_BATCH)
        logger.debug("rank %d encoded %d images and %d texts", distributed.rank(), images_encoded, texts_encoded)
        self.last_encoded = {  # this process's share, for logs and tests
            "images": images_encoded, "texts": texts_encoded}

        def itm_fn(images, ids, masks):
            with trainer.autocast():
                return model.itm_logits_from_embeds(images, ids, masks)

        k_test = dataset_cfg.k_test if dataset_cfg else DEFAULT_K_TEST
        add_itm = dataset_cfg.add_extra_itm_score if dataset_cfg else True
        top = retrieval.topk_scores(itm_fn, model.similarity, image_feats, text_feats, image_embeds, text_ids,
                                    text_mask, k_test, rows_per_chunk=min(batch_size, MAX_ROWS_PER_CHUNK),
                                    batch_size=batch_size * ITM_PAIRS_PER_IMAGE, add_itm=add_itm,
                                    progress=trainer.is_main)
        return retrieval.topk_retrieval_metrics(top["i2t"], top["t2i"], dataset.img2txt, dataset.txt2img)

    def predict(self, trainer, input_data, candidate_texts: Sequence[str] | None = None, top_k: int | None = 3,
                num_beams: int = 3, max_length: int = CAPTION_MAX_LENGTH, min_length: int = 1,
                **_) -> list[dict[str, Any]]:
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


class RetrievalFinetuneTask(PretrainTask):
    """Retrieval fine-tuning on the user's pairs (the paper's COCO fine-tuning): the stage-1 losses with every pair of
    the same image a positive (``image_ids`` from the annotations' ``image_id``, else the image file): ITC spreads
    its target over them, ITM never draws them as hard negatives. Evaluation is retrieval."""

    name = "image_text_retrieval_finetune"

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        if "image_ids" not in batch:
            raise ValueError(f"{self.name} needs an image id per pair: the training data set gives none (use "
                             "MultiImgCapDataLoader or WebDataset shards)")
        output = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], gather=gather,
                       image_ids=batch["image_ids"])
        return {"loss": output.loss, "loss_itc": output.loss_itc, "loss_itm": output.loss_itm,
                "loss_lm": output.loss_lm}


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
        loader = eval_loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size,
                         trainer.config.eval_dataset.num_workers if trainer.config.eval_dataset else 0)
        image_feats, _, targets = encode_images(model, loader, trainer.device, keep_embeds=False,
                                                autocast=trainer.autocast, progress=trainer.is_main)
        logits = zero_shot_logits(model, image_feats, label_feats).cpu()
        return topk_accuracy(logits, targets, ks=TOP_K_ACCURACY)

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
