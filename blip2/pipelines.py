"""``pipeline(task, model=...)``: inference on raw images and strings.

Stage-1 tasks: ``zero_shot_image_classification`` (softmax over candidate labels) and ``image_text_retrieval`` (ITC
ranking re-ranked by ITM, as retrieval evaluation does; with only images or only texts it returns features, so
``feature_extraction`` is the same pipeline). The scoring itself lives in ``blip2.engine.tasks`` and
``blip2.engine.retrieval``. Stage 2: ``image_to_text_generation`` (captions, optionally continuing a prompt, by
``Blip2ImageToTextGeneration.generate``). This module loads images, batches them and formats the results.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from blip2 import registry
from blip2.engine.retrieval import rerank_scores
from blip2.engine.tasks import DEFAULT_TEMPLATE, encode_texts, label_features, ranked_labels, zero_shot_logits
from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer
from blip2.processing import (Blip2GenerationProcessor, Blip2ImageProcessor, Blip2Processor, clean_caption,
                              load_tokenizer)
from blip2.processing.image import ImageInput
from blip2.processing.processor import VOCAB_FILE

MAX_CACHED_LABEL_SETS = 16


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
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        for start in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(images[start : start + batch_size])["pixel_values"]
            yield pixels.to(self.device)  # (b, 3, S, S)


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
        feats, embeds = [], []
        for pixel_values in self._pixel_batches(images, batch_size):
            with self.autocast():
                image_embeds = self.model.encode_image(pixel_values)  # (b, T, D)
                query_hidden = self.model.query_forward(image_embeds).last_hidden_state  # (b, Q, D)
                feats.append(self.model.image_feats(query_hidden).float())
            embeds.append(image_embeds)
        return torch.cat(feats), torch.cat(embeds)

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

            # pairs per ITM call: images are cheap to repeat once encoded, so batch well beyond batch_size
            score_i2t, score_t2i = rerank_scores(itm_fn, sims, image_embeds, text_ids, text_mask, k_test,
                                                 batch_size=batch_size * 16, split_across_ranks=False)
            limit = k_test if top_k is None else min(top_k, k_test)
        else:
            score_i2t, score_t2i = sims, sims.t()
            limit = top_k
        image_to_text = [[{"index": i, "text": text_list[i], "score": s} for i, s in ranking]
                         for ranking in _rank_rows(score_i2t, limit)]
        text_to_image = [[{"index": i, "score": s} for i, s in ranking] for ranking in _rank_rows(score_t2i, limit)]
        return {"image_to_text": image_to_text, "text_to_image": text_to_image}


def _rank_rows(scores: torch.Tensor, limit: int | None) -> list[list[tuple[int, float]]]:
    """Per row, (column, score) pairs of the ``limit`` best columns, best first (ties: lower index first)."""
    k = scores.shape[1] if limit is None else min(limit, scores.shape[1])
    values, index = scores.float().cpu().sort(dim=1, descending=True, stable=True)
    return [list(zip(row_index[:k], row_values[:k])) for row_index, row_values in zip(index.tolist(), values.tolist())]


GENERATED_TEXT = "generated_text"
IDENTITY_TEMPLATE = "{}"


def apply_template(template: str, prompt: str | None) -> str:
    """``template.format(prompt).strip()``, as the seed builds a prompt; no prompt formats in "" (so a template
    without ``{}`` is itself the prompt). A template without ``{}`` refuses a prompt it would silently drop."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if prompt and "{}" not in template:
        raise ValueError(f"hypothesis_template={template!r} has no {{}} for the prompt {prompt!r}, which would be "
                         "dropped: use a template with {} (the default is '{}') or leave the prompt out")
    return template.format(prompt or "").strip()


def _check_template(template: str) -> None:
    if not isinstance(template, str):
        raise TypeError(f"hypothesis_template must be a string, got {type(template).__name__}")
    try:
        template.format("")
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"hypothesis_template={template!r} must have at most one plain {{}} slot "
                         "(write literal braces as {{ and }})") from None


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
        _check_template(hypothesis_template)
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
        if not batch:
            raise ValueError("no images given")
        batch, prompts = self._split_prompts(batch, prompt)
        batch_size = batch_size or self.batch_size
        results: list = []
        for start, pixel_values in zip(range(0, len(batch), batch_size), self._pixel_batches(batch, batch_size)):
            results += self.generate_from_pixels(pixel_values, prompts[start:start + batch_size], hypothesis_template,
                                                 return_full_text, **generation_kwargs)
        return results[0] if single else results

    @torch.no_grad()
    def generate_from_pixels(self, pixel_values: torch.Tensor, prompts: str | Sequence[str | None] | None = None,
                             hypothesis_template: str | None = None, return_full_text: bool | None = None,
                             **generation_kwargs) -> list:
        """The outputs for an already processed batch ``pixel_values`` (B, 3, S, S) on the pipeline's device;
        ``prompts``: one for all images (or None) or one per image. Evaluation loops feed their batches here."""
        if prompts is None or isinstance(prompts, str):
            prompts = [prompts] * pixel_values.shape[0]
        template = hypothesis_template if hypothesis_template is not None else self.hypothesis_template
        _check_template(template)
        default = self.default_prompt
        texts = [apply_template(template, default if text is None else text) for text in prompts]
        full_text = self.return_full_text if return_full_text is None else return_full_text
        settings = {**self.generation_kwargs, **generation_kwargs}
        prompt_ids = self.processor.encode(texts)
        tokens = {name: value.to(self.device) for name, value in self.processor.pad(prompt_ids).items()}
        with self.autocast():
            new_ids = self.model.generate(pixel_values, tokens["input_ids"], tokens["attention_mask"], **settings)
        per_image = new_ids.shape[0] // len(texts)  # num_return_sequences rows per image, image by image
        outputs = [{GENERATED_TEXT: self._text(texts[row // per_image], prompt_ids[row // per_image], ids, full_text)}
                   for row, ids in enumerate(new_ids.cpu().tolist())]
        return outputs if per_image == 1 else [outputs[i:i + per_image] for i in range(0, len(outputs), per_image)]

    @property
    def default_prompt(self) -> str | None:
        """The prompt of an image given none: the model's own (``model_config.prompt``, the text its stage-2 training
        put before every caption, as LAVIS generates after it), else None (the LLM's BOS alone)."""
        prompt = self.model.config.prompt
        return prompt if isinstance(prompt, str) and prompt else None

    def _text(self, prompt: str, prompt_ids: list[int], new_ids: list[int], full_text: bool) -> str:
        continuation = self.processor.continuation(prompt_ids, new_ids)
        return (prompt + continuation).strip() if full_text else continuation.strip()

    @staticmethod
    def _split_prompts(batch: list, prompt: str | Sequence[str] | None) -> tuple[list[ImageInput], list[str | None]]:
        """(images, one prompt or None per image) from the inputs (dicts included) and ``prompt``."""
        given = [item.get("prompt") if isinstance(item, dict) else None for item in batch]
        images = []
        for item in batch:
            if isinstance(item, dict):
                if "image" not in item or set(item) - {"image", "prompt"}:
                    raise ValueError(f"an input dict needs 'image' and may have 'prompt'; got keys {sorted(item)}")
                item = item["image"]
            images.append(item)
        if prompt is None:
            return images, given
        if any(text is not None for text in given):
            raise ValueError("prompts given twice: in the input dicts and as prompt=; give them one way")
        if isinstance(prompt, str):
            return images, [prompt] * len(images)
        prompts = list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts for {len(images)} images: give one prompt for all, or one "
                             "per image")
        return images, prompts


PIPELINES: dict[str, type[_Pipeline]] = {
    ZeroShotImageClassificationPipeline.task: ZeroShotImageClassificationPipeline,
    ImageTextRetrievalPipeline.task: ImageTextRetrievalPipeline,
    "feature_extraction": ImageTextRetrievalPipeline,
    ImageToTextGenerationPipeline.task: ImageToTextGenerationPipeline,
}


def _saved_folder(source: str | os.PathLike | None) -> Path | None:
    """The folder a model was read from (a preset's under $BLIP2_HOME), or None (an object, or a file)."""
    if source is None:
        return None
    if str(source) in registry.PRESETS:
        return registry.get_preset(str(source)).directory()
    return Path(source) if Path(source).is_dir() else None


def model_source(model, source: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """Where the model's processor files are: ``source`` if given, else where ``from_pretrained`` read the model
    (``model.name_or_path``: a preset name or a path), else None (a model built from a config)."""
    return source if source is not None else getattr(model, "name_or_path", None)


def image_processor_for(model, source: str | os.PathLike | None, seed: int | None = None) -> Blip2ImageProcessor:
    """The image processor saved with ``source`` (a preset or a folder) if any, else one from the model's config."""
    if source is not None and (str(source) in registry.PRESETS or Path(source).is_dir()):
        with contextlib.suppress(FileNotFoundError):
            return Blip2ImageProcessor.from_pretrained(source, seed=seed)
    config = model.config
    preset = registry.PRESETS.get(config.checkpoint_name_or_path or "")
    stats = (preset.image_mean, preset.image_std) if preset is not None else ()  # else CLIP's, the default
    return Blip2ImageProcessor(config.vision_config.image_size, *stats, seed=seed)


def saved_vocab(source: str | os.PathLike | None) -> Path | None:
    """The Q-Former vocabulary (``vocab.txt``) saved with the model ``source`` (a preset's folder or a folder)."""
    folder = _saved_folder(source)
    vocab = folder / VOCAB_FILE if folder is not None else None
    return vocab if vocab is not None and vocab.is_file() else None


def default_processor(model: Blip2Qformer, source: str | os.PathLike | None = None,
                      seed: int | None = None) -> Blip2Processor:
    """The processor saved with the model (``source``, else ``model.name_or_path``: a preset or a folder) if any,
    else one built from the model's config: its image settings, the vocab.txt beside it or bert-base-uncased's."""
    source = model_source(model, source)
    vocab = saved_vocab(source)
    return Blip2Processor(image_processor_for(model, source, seed), load_tokenizer(vocab), model.config.max_txt_len)


def generation_processor(model: Blip2ImageToTextGeneration, source: str | os.PathLike | None = None,
                         tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None
                         ) -> Blip2GenerationProcessor:
    """The image processor saved with ``source`` (else one from the model's config) and the LLM's tokenizer:
    ``tokenizer`` (a tokenizer or a folder), else the LLM folder's (``model.llm_folder``), else one saved in the
    model's folder (``source``: a transformers BLIP-2 folder with its processor, or ours with
    ``Blip2GenerationProcessor.save_pretrained``)."""
    from blip2.llm import has_tokenizer_files, load_llm_tokenizer

    source = model_source(model, source)
    image_processor = image_processor_for(model, source)
    if tokenizer is not None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_llm_tokenizer(tokenizer)
        return Blip2GenerationProcessor(image_processor, tokenizer)
    model_folder = _saved_folder(source)
    candidates = [("the LLM folder", model.llm_folder), ("the model folder", model_folder)]
    looked = []
    for what, folder in candidates:
        if folder is not None and has_tokenizer_files(folder):
            return Blip2GenerationProcessor(image_processor, load_llm_tokenizer(folder))
        looked.append(f"{what} {folder}" if folder is not None else
                      ("no LLM folder (text_config has no checkpoint_name_or_path)" if what == "the LLM folder"
                       else "no model folder (the model was given as an object)"))
    raise FileNotFoundError(
        "no tokenizer for the LLM: looked for tokenizer.json, tokenizer.model or vocab.json + merges.txt in "
        + "; ".join(looked) + ". Pass tokenizer= (a tokenizer or its folder), or save one beside the model with "
        "Blip2GenerationProcessor(image_processor, tokenizer).save_pretrained(folder)"
    )


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
