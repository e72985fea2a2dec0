"""``pipeline(task, model=...)``: inference on raw images and strings.

Stage-1 tasks: ``zero_shot_image_classification`` (softmax over candidate labels) and ``image_text_retrieval`` (ITC
ranking re-ranked by ITM, as retrieval evaluation does; with only images or only texts it returns features, so
``feature_extraction`` is the same pipeline). The scoring itself lives in ``blip2.models.scoring``, shared with
evaluation. Stage 2: ``image_to_text_generation`` (captions, optionally continuing a prompt, by
``Blip2ImageToTextGeneration.generate`` through ``blip2.processing.prompts``). This module loads images, batches them
and formats the results.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip2 import registry
from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer
from blip2.models.scoring import (encode_images, encode_texts, label_features, rank_rows, ranked_labels,
                                  rerank_scores, zero_shot_logits)
from blip2.processing import Blip2GenerationProcessor, Blip2Processor, clean_caption
from blip2.processing import prompts as prompting
from blip2.processing.auto import default_processor, generation_processor
from blip2.processing.image import ImageInput
from blip2.processing.prompts import DEFAULT_TEMPLATE, IDENTITY_TEMPLATE

MAX_CACHED_LABEL_SETS = 16
# pairs per ITM call, per image of batch_size: images are cheap to repeat once encoded, so batch well beyond it
ITM_PAIRS_PER_IMAGE = 16


def _as_list(items: Any) -> tuple[list, bool]:
    """(items as a list, whether a single item was given): a list or tuple is a batch, anything else one item."""
    if isinstance(items, (list, tuple)):
        return list(items), False
    return [items], True


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive int or None")


class _Pipeline:
    """Holds the model (in eval mode, on ``device``), the processor, and the autocast policy."""

    model_class: type = Blip2Qformer

    def __init__(self, model: Blip2Qformer, processor: Blip2Processor, device: torch.device,
                 batch_size: int = 8) -> None:
        self.model = model.to(device).eval()
        self.processor = processor
        self.device = device
        self.batch_size = batch_size

    def autocast(self):
        """The model's compute-dtype autocast on the pipeline's device."""
        return self.model.autocast(self.device)

    def _pixel_batches(self, images: list[ImageInput], batch_size: int):
        return prompting.pixel_batches(self.processor.image_processor, images, batch_size, self.device)


class ZeroShotImageClassificationPipeline(_Pipeline):
    """Images -> candidate labels ranked by softmax(max-over-queries cosine / temp), as ``[{"score", "label"}]``."""

    task = "zero_shot_image_classification"

    def __init__(self, model: Blip2Qformer, processor: Blip2Processor, device: torch.device,
                 candidate_labels: Sequence[str] | None = None,
                 hypothesis_template: str | Sequence[str] = DEFAULT_TEMPLATE, top_k: int | None = None,
                 batch_size: int = 8) -> None:
        super().__init__(model, processor, device, batch_size)
        _check_top_k(top_k)
        self.candidate_labels = list(candidate_labels) if candidate_labels is not None else None
        self.hypothesis_template = hypothesis_template
        self.top_k = top_k
        self._label_cache: dict[tuple[tuple[str, ...], tuple[str, ...]], torch.Tensor] = {}

    @torch.no_grad()
    def label_features(self, labels: Sequence[str], templates: str | Sequence[str]) -> torch.Tensor:
        """Normalized (C, E) label features, averaged over templates; cached per (labels, templates)."""
        key = (tuple(labels), (templates,) if isinstance(templates, str) else tuple(templates))
        if key not in self._label_cache:
            if len(self._label_cache) >= MAX_CACHED_LABEL_SETS:
                self._label_cache.pop(next(iter(self._label_cache)))  # the oldest entry
            with self.autocast():
                self._label_cache[key] = label_features(self.model, self.processor.tokenizer, key[0], key[1],
                                                        self.processor.max_length, self.device)
        return self._label_cache[key]

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput], candidate_labels: Sequence[str] | None = None,
                 hypothesis_template: str | Sequence[str] | None = None, top_k: int | None = None,
                 batch_size: int | None = None) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """One image -> a ranked list of ``{"score", "label"}``; a list of images -> a list of such lists."""
        labels = candidate_labels if candidate_labels is not None else self.candidate_labels
        if isinstance(labels, str):
            labels = [labels]
        if not labels:
            raise ValueError(f"{self.task} needs candidate_labels: give them to pipeline(...) or to the call")
        labels = list(labels)
        templates = hypothesis_template if hypothesis_template is not None else self.hypothesis_template
        if not isinstance(templates, str) and not templates:
            raise ValueError("hypothesis_template must be a string or a non-empty list of strings")
        top_k = top_k if top_k is not None else self.top_k
        _check_top_k(top_k)
        batch, single = _as_list(images)
        label_feats = self.label_features(labels, templates)  # (C, E)
        results: list[list[dict[str, Any]]] = []
        for pixel_values in self._pixel_batches(batch, batch_size or self.batch_size):
            with self.autocast():
                image_feats = self.model.get_image_features(pixel_values).float()  # (b, Q, E)
            probs = zero_shot_logits(self.model, image_feats, label_feats).softmax(-1).cpu()  # (b, C)
            results.extend(ranked_labels(probs, labels, top_k))
        return results[0] if single else results


class ImageTextRetrievalPipeline(_Pipeline):
    """Images and texts -> both rankings (ITC, re-ranked by ITM); images or texts alone -> their features."""

    task = "image_text_retrieval"

    @torch.no_grad()
    def encode_images(self, images: list[ImageInput], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Query features (N, Q, E) in float32 and ln_vision(ViT) outputs (N, T, D) for ITM."""
        batches = ({"pixel_values": pixels} for pixels in self._pixel_batches(images, batch_size))
        feats, embeds, _ = encode_images(self.model, batches, self.device, autocast=self.autocast)
        return feats, embeds

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cleaned as retrieval captions are (``clean_caption``): features (N, E), ids and masks (N, L)."""
        if not all(isinstance(text, str) for text in texts):
            raise TypeError("texts must be strings")
        with self.autocast():
            return encode_texts(self.model, self.processor.tokenizer, [clean_caption(t) for t in texts],
                                self.processor.max_length, self.device, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, images: ImageInput | Sequence[ImageInput] | None = None,
                 texts: str | Sequence[str] | None = None, top_k: int | None = 5, rerank: bool = True,
                 k_test: int = 128, batch_size: int | None = None
                 ) -> dict[str, list] | list[torch.Tensor] | torch.Tensor:
        """Both given: ``{"image_to_text": [[{"index", "text", "score"}]], "text_to_image": [[{"index", "score"}]]}``,
        one ranked list per image / per text, best first (``top_k=None``: all).

        With ``rerank`` the ``k_test`` best ITC candidates are re-scored as ITM match logit + ITC cosine, exactly as
        retrieval evaluation does, and a list holds only those. Only images: a (Q, E) feature per image; only texts:
        an (E,) feature per text (one tensor, not a list, for a single input).
        """
        if images is None and texts is None:
            raise ValueError(f"{self.task} needs images, texts or both")
        _check_top_k(top_k)
        if not isinstance(k_test, int) or k_test < 1:
            raise ValueError(f"k_test={k_test!r} must be a positive int")
        batch_size = batch_size or self.batch_size
        image_list, single_image = _as_list(images) if images is not None else ([], False)
        text_list, single_text = _as_list(texts) if texts is not None else ([], False)
        if (images is not None and not image_list) or (texts is not None and not text_list):
            raise ValueError("empty images or texts list")
        if texts is None:
            image_feats = self.encode_images(image_list, batch_size)[0].cpu()
            return image_feats[0] if single_image else list(image_feats)
        if images is None:
            text_feats = self.encode_texts(text_list, batch_size)[0].cpu()
            return text_feats[0] if single_text else list(text_feats)

        image_feats, image_embeds = self.encode_images(image_list, batch_size)
        text_feats, text_ids, text_mask = self.encode_texts(text_list, batch_size)
        sims = self.model.similarity(image_feats, text_feats)  # (N_img, N_txt)
        if rerank:
            def itm_fn(embeds, ids, masks):
                with self.autocast():
                    return self.model.itm_logits_from_embeds(embeds, ids, masks)

            score_i2t, score_t2i = rerank_scores(itm_fn, sims, image_embeds, text_ids, text_mask, k_test,
                                                 batch_size=batch_size * ITM_PAIRS_PER_IMAGE)
            limit = k_test if top_k is None else min(top_k, k_test)
        else:
            score_i2t, score_t2i = sims, sims.t()
            limit = top_k
        image_to_text = [[{"index": i, "text": text_list[i], "score": s} for i, s in ranking]
                         for ranking in rank_rows(score_i2t, limit)]
        text_to_image = [[{"index": i, "score": s} for i, s in ranking] for ranking in rank_rows(score_t2i, limit)]
        return {"image_to_text": image_to_text, "text_to_image": text_to_image}


class ImageToTextGenerationPipeline(_Pipeline):
    """Images (and prompts) -> text by ``Blip2ImageToTextGeneration.generate``, ``{"generated_text": str}`` per image.

    The prompt of an image is ``hypothesis_template.format(prompt).strip()`` (template default ``"{}"``; prompt default
    the model's ``config.prompt`` when it is a text, else none); the text includes the prompt unless
    ``return_full_text=False``. Keyword arguments other than the pipeline's own are
    generation settings (``max_new_tokens``, ``num_beams``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``length_penalty``, ``min_new_tokens``, ``num_return_sequences``, ...), passed to
    ``generate`` as given; those given to a call override those given to ``pipeline(...)``, and what neither gives
    comes from the model's ``generation_defaults`` (the seed's ``text_config`` settings).
    """

    task = "image_to_text_generation"
    model_class = Blip2ImageToTextGeneration

    def __init__(self, model: Blip2ImageToTextGeneration, processor: Blip2GenerationProcessor,
                 device: torch.device, hypothesis_template: str = IDENTITY_TEMPLATE, return_full_text: bool = True,
                 batch_size: int = 8, **generation_kwargs) -> None:
        super().__init__(model, processor, device, batch_size)
        prompting.check_template(hypothesis_template)
        self.hypothesis_template = hypothesis_template
        self.return_full_text = return_full_text
        self.generation_kwargs = generation_kwargs

    @torch.no_grad()
    def __call__(self, images: ImageInput | dict | Sequence[ImageInput | dict],
                 prompt: str | Sequence[str] | None = None, hypothesis_template: str | None = None,
                 return_full_text: bool | None = None, batch_size: int | None = None,
                 **generation_kwargs) -> dict[str, str] | list:
        """One image -> ``{"generated_text": str}``; a list of images -> a list of them, in order.

        ``images``: paths, PIL images, uint8 arrays, or ``{"image": ..., "prompt": str}`` dicts (the seed's form).
        ``prompt``: one string for every image, or a list with one per image. With ``num_return_sequences`` = n > 1
        each image gives a list of n dicts instead of one.
        """
        batch, single = _as_list(images)
        results = prompting.generate(self.model, self.processor, batch, prompt, self.device,
                                     batch_size or self.batch_size, **self._options(hypothesis_template,
                                                                                    return_full_text,
                                                                                    generation_kwargs))
        return results[0] if single else results

    @torch.no_grad()
    def generate_from_pixels(self, pixel_values: torch.Tensor, prompts: str | Sequence[str | None] | None = None,
                             hypothesis_template: str | None = None, return_full_text: bool | None = None,
                             **generation_kwargs) -> list:
        """The outputs for an already processed batch ``pixel_values`` (B, 3, S, S) on the pipeline's device;
        ``prompts``: one for all images (or None) or one per image."""
        return prompting.generate_from_pixels(self.model, self.processor, pixel_values, prompts,
                                              **self._options(hypothesis_template, return_full_text,
                                                              generation_kwargs))

    def _options(self, hypothesis_template: str | None, return_full_text: bool | None,
                 generation_kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's template, full-text choice and generation settings over the pipeline's, plus its autocast."""
        template = hypothesis_template if hypothesis_template is not None else self.hypothesis_template
        full_text = self.return_full_text if return_full_text is None else return_full_text
        return {"template": template, "full_text": full_text, "autocast": self.autocast,
                **self.generation_kwargs, **generation_kwargs}

    @property
    def default_prompt(self) -> str | None:
        """The prompt of an image given none: the model's own (``model_config.prompt``), else None."""
        return prompting.default_prompt(self.model)


PIPELINES: dict[str, type[_Pipeline]] = {
    ZeroShotImageClassificationPipeline.task: ZeroShotImageClassificationPipeline,
    ImageTextRetrievalPipeline.task: ImageTextRetrievalPipeline,
    "feature_extraction": ImageTextRetrievalPipeline,
    ImageToTextGenerationPipeline.task: ImageToTextGenerationPipeline,
}


def pipeline(task: str, model: Blip2Qformer | Blip2ImageToTextGeneration | str | os.PathLike | None = None,
             processor: Blip2Processor | Blip2GenerationProcessor | None = None,
             device: str | torch.device | None = None,
             tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None, **kwargs) -> _Pipeline:
    """A callable for ``task`` with ``model``: a Blip2Qformer (stage-1 tasks) or a Blip2ImageToTextGeneration
    (``image_to_text_generation``), or a preset name or a path ``from_pretrained`` reads.

    ``processor`` defaults to the one saved where the model was read from (``model.name_or_path``), else one built
    from its config; ``device`` to the model's. ``tokenizer`` (generation only) is
    the LLM's tokenizer or its folder, when neither the LLM folder nor the model folder has one. Other keyword
    arguments are the pipeline's defaults (``candidate_labels``, ``hypothesis_template``, ``top_k``, ``batch_size``,
    generation settings such as ``max_new_tokens``, ...).
    """
    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; available tasks: {', '.join(PIPELINES)}")
    pipeline_class = PIPELINES[task]
    model_class = pipeline_class.model_class
    generation = pipeline_class is ImageToTextGenerationPipeline
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: a {model_class.__name__}, a preset name "
                         f"({', '.join(registry.names(model_class.preset_group))}) or a path")
    if tokenizer is not None and (not generation or processor is not None):
        raise ValueError("tokenizer= is for image_to_text_generation without processor= (a processor carries its "
                         "own tokenizer)")
    source = None
    if isinstance(model, (str, os.PathLike)):
        source, model = model, model_class.from_pretrained(model)
    if not isinstance(model, model_class):
        stage = "stage-2" if generation else "stage-1"
        raise TypeError(f"{task} needs a {model_class.__name__} ({stage}) model, got {type(model).__name__}")
    if processor is None:
        processor = generation_processor(model, source, tokenizer) if generation else default_processor(model, source)
    device = torch.device(device) if device is not None else model.device
    return pipeline_class(model, processor, device, **kwargs)
