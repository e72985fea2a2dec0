"""Prompts and prompted generation, shared by stage-2 evaluation (``blip2.engine``) and inference
(``blip2.pipelines``).

The prompt of an image is ``hypothesis_template.format(prompt).strip()`` (template default ``"{}"``; prompt default the
model's ``config.prompt`` when it is a text, else none). ``generate_from_pixels`` tokenizes the prompts through a
``Blip2GenerationProcessor``, calls ``Blip2ImageToTextGeneration.generate`` and decodes the continuation.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from blip2.processing.image import ImageInput

DEFAULT_TEMPLATE = "This is a photo of {}."  # zero-shot classification: the label's text
IDENTITY_TEMPLATE = "{}"  # image-to-text generation: the prompt as given
VQA_TEMPLATE = "Question: {} Answer:"
GENERATED_TEXT = "generated_text"


def apply_template(template: str, prompt: str | None) -> str:
    """``template.format(prompt).strip()``, as the seed builds a prompt; no prompt formats in "" (so a template
    without ``{}`` is itself the prompt). A template without ``{}`` refuses a prompt it would silently drop."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
    if prompt and "{}" not in template:
        raise ValueError(f"hypothesis_template={template!r} has no {{}} for the prompt {prompt!r}, which would be "
                         "dropped: use a template with {} (the default is '{}') or leave the prompt out")
    return template.format(prompt or "").strip()


def check_template(template: str) -> None:
    """A template is a string with at most one plain ``{}`` slot."""
    if not isinstance(template, str):
        raise TypeError(f"hypothesis_template must be a string, got {type(template).__name__}")
    try:
        template.format("")
    except (IndexError, KeyError, ValueError):
        raise ValueError(f"hypothesis_template={template!r} must have at most one plain {{}} slot "
                         "(write literal braces as {{ and }})") from None


def default_prompt(model) -> str | None:
    """The prompt of an image given none: the model's own (``model_config.prompt``, the text its stage-2 training put
    before every caption, as LAVIS generates after it), else None (the LLM's BOS alone)."""
    prompt = model.config.prompt
    return prompt if isinstance(prompt, str) and prompt else None


def split_prompts(batch: list, prompt: str | Sequence[str] | None) -> tuple[list[ImageInput], list[str | None]]:
    """(images, one prompt or None per image) from the inputs (``{"image", "prompt"}`` dicts included) and
    ``prompt`` (one for every image, or one per image)."""
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


def continuation_text(processor, prompt: str, prompt_ids: list[int], new_ids: list[int], full_text: bool) -> str:
    """The generated text: the continuation of ``prompt``, with the prompt in front when ``full_text``."""
    continuation = processor.continuation(prompt_ids, new_ids)
    return (prompt + continuation).strip() if full_text else continuation.strip()


@torch.no_grad()
def generate_from_pixels(model, processor, pixel_values: torch.Tensor,
                         prompts: str | Sequence[str | None] | None = None, template: str = IDENTITY_TEMPLATE,
                         full_text: bool = True, autocast: Callable[[], Any] = contextlib.nullcontext,
                         **settings) -> list:
    """``{"generated_text"}`` per image of a processed batch ``pixel_values`` (B, 3, S, S) on the model's device;
    ``prompts``: one for all images (or None: the model's own) or one per image, each put through ``template``;
    ``settings`` go to ``model.generate``. With ``num_return_sequences`` = n > 1 each image gives a list of n."""
    if prompts is None or isinstance(prompts, str):
        prompts = [prompts] * pixel_values.shape[0]
    check_template(template)
    default = default_prompt(model)
    texts = [apply_template(template, default if text is None else text) for text in prompts]
    prompt_ids = processor.encode(texts)
    tokens = {name: value.to(pixel_values.device) for name, value in processor.pad(prompt_ids).items()}
    with autocast():
        new_ids = model.generate(pixel_values, tokens["input_ids"], tokens["attention_mask"], **settings)
    per_image = new_ids.shape[0] // len(texts)  # num_return_sequences rows per image, image by image
    outputs = [{GENERATED_TEXT: continuation_text(processor, texts[row // per_image], prompt_ids[row // per_image],
                                                  ids, full_text)}
               for row, ids in enumerate(new_ids.cpu().tolist())]
    return outputs if per_image == 1 else [outputs[i:i + per_image] for i in range(0, len(outputs), per_image)]


def pixel_batches(image_processor, images: list[ImageInput], batch_size: int, device: torch.device):
    """``pixel_values`` (b, 3, S, S) on ``device`` for each run of ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for start in range(0, len(images), batch_size):
        yield image_processor(images[start : start + batch_size])["pixel_values"].to(device)


@torch.no_grad()
def generate(model, processor, images: list, prompt: str | Sequence[str] | None, device: torch.device,
             batch_size: int, template: str = IDENTITY_TEMPLATE, full_text: bool = True,
             autocast: Callable[[], Any] = contextlib.nullcontext, **settings) -> list:
    """The outputs for ``images`` (paths, PIL images, arrays, or ``{"image", "prompt"}`` dicts), in order, batch by
    batch (see ``generate_from_pixels``)."""
    if not images:
        raise ValueError("no images given")
    images, prompts = split_prompts(images, prompt)
    results: list = []
    batches = pixel_batches(processor.image_processor, images, batch_size, device)
    for start, pixel_values in zip(range(0, len(images), batch_size), batches):
        results += generate_from_pixels(model, processor, pixel_values, prompts[start:start + batch_size], template,
                                        full_text, autocast, **settings)
    return results
