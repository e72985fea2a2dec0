"""Stage-2 tasks: training the Q-Former to prompt a frozen LLM, image-to-text generation (captions, VQA), and the
caption-LM pretraining of a plain causal LM.

``image_to_text_generation_pretrain`` is stage-2 training (the seed runs it under
``contrastive_language_image_pretrain``, which the Trainer accepts for a stage-2 model too); its evaluation, like
``image_to_text_generation``'s, captions the eval set's images and scores them against the references (BLEU, CIDEr).
``image_to_text_generation`` predicts: captions, or answers with ``hypothesis_template="Question: {} Answer:"``.

``causal_lm_pretrain`` trains a plain transformers causal LM (``model=``, with its ``tokenizer=``) on caption text
(``CaptionTexts``): the demo's way to make a small LLM that reads its context. Half of the training sequences are
``[a bag of the caption's word pieces, shuffled] <s> caption </s>`` (the loss on the caption only), so the LM learns
to write a caption that uses the words before it, the in-context skill a pretrained LLM brings to stage 2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from blip2.engine import distributed
from blip2.engine.caption_metrics import caption_metrics
from blip2.engine.tasks.base import Task, eval_loader
from blip2.processing import prompts
from blip2.processing.prompts import IDENTITY_TEMPLATE

# LAVIS evaluates captions with 5 beams; the length limit is the model's (text_config.seq_length, or max_txt_len)
CAPTION_SETTINGS = {"num_beams": 5, "min_new_tokens": 1}
IGNORE_INDEX = -100  # a label the LM loss skips
CONTEXT_FRACTION = 0.5  # causal_lm_pretrain: share of sequences with a context before <s>
MAX_CONTEXT = 12  # causal_lm_pretrain: word pieces in a context at most


def generation_setup(trainer, hypothesis_template: str | None = None):
    """(model in eval mode, generation processor, prompt template) over the trainer's model, image processor and LLM
    tokenizer; the template: given, else the Trainer's, else the eval set's, else ``"{}"``."""
    from blip2.processing import Blip2GenerationProcessor

    cfg = trainer.config.eval_dataset
    template = (hypothesis_template or getattr(trainer, "task_options", {}).get("hypothesis_template")
                or (cfg.data_loader.hypothesis_template if cfg else None) or IDENTITY_TEMPLATE)
    prompts.check_template(template)
    model = distributed.unwrap(trainer.model).eval()
    return model, Blip2GenerationProcessor(trainer.image_processor, trainer.tokenizer), template


def image_name(image, index: int) -> str:
    return str(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"


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
        model, processor, template = generation_setup(trainer, hypothesis_template)
        prompt = cfg.text_transforms.prompt or None  # None: the model's own prompt (model_config.prompt), if any
        loader = eval_loader(dataset, trainer.image_collator(train=False), trainer.eval_batch_size, cfg.num_workers)
        settings = {**CAPTION_SETTINGS, **generation_kwargs}
        candidates: dict[int, str] = {}
        for batch in tqdm(loader, desc="caption", disable=not trainer.is_main, leave=False):
            if batch is None:
                continue
            outputs = prompts.generate_from_pixels(model, processor, batch["pixel_values"].to(trainer.device), prompt,
                                                   template, full_text=False, autocast=trainer.autocast, **settings)
            candidates.update(zip(batch["indices"].tolist(), (output["generated_text"] for output in outputs)))
        references = {i: [dataset.texts[j] for j in dataset.img2txt[i]] for i in candidates}
        if trainer.is_main:
            write_captions(trainer.output_dir, dataset, candidates, references)
        return caption_metrics(references, candidates)

    def predict(self, trainer, input_data, prompt: str | Sequence[str] | None = None,
                hypothesis_template: str | None = None, return_full_text: bool | None = None,
                batch_size: int | None = None, **kwargs) -> list[dict[str, Any]]:
        """For each image ``{"image", "generated_text"}``, as the ``image_to_text_generation`` pipeline gives it: the
        text starts with the prompt unless ``return_full_text=False``; ``prompt`` is one string or one per image (a
        question, with ``hypothesis_template="Question: {} Answer:"``); other keywords are generation settings."""
        images = list(input_data) if isinstance(input_data, (list, tuple)) else [input_data]
        model, processor, template = generation_setup(trainer, hypothesis_template)
        full_text = True if return_full_text is None else return_full_text
        outputs = prompts.generate(model, processor, images, prompt, trainer.device,
                                   batch_size or trainer.eval_batch_size, template=template, full_text=full_text,
                                   autocast=trainer.autocast, **kwargs)
        return [{"image": image_name(image, index), **output}
                for index, (image, output) in enumerate(zip(images, outputs))]


def write_captions(output_dir: Path, dataset, candidates: dict[int, str], references: dict[int, list[str]]) -> None:
    """``<output_dir>/captions.json``: per image its index (and path), the generated caption and the references."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = getattr(dataset, "image_paths", None)
    rows = [{"image_index": i, **({"image": str(paths[i])} if paths else {}), "caption": text,
             "references": references[i]} for i, text in sorted(candidates.items())]
    (output_dir / "captions.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


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


# ------------------------------------------------------------------------------------------- caption-LM pretraining


def train_sentencepiece(texts: Sequence[str], path: str | os.PathLike, vocab_size: int = 256,
                        **trainer_options) -> Path:
    """A BPE ``tokenizer.model`` over ``texts`` with Llama's special ids (<unk>=0, <s>=1, </s>=2);
    ``trainer_options`` go to sentencepiece's trainer (default: no byte fallback, for a small vocabulary)."""
    import sentencepiece as spm

    path = Path(path)
    options = dict(model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   character_coverage=1.0, num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = str(Path(scratch) / "sp")
        spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_prefix=prefix,
                                       **{**options, **trainer_options})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Path(prefix + ".model").read_bytes())
    return path


def training_row(tokenizer, text: str, rng: random.Random, context_fraction: float,
                 max_context: int) -> tuple[list[int], list[int]]:
    """(ids, labels) for ``[context] <s> text </s>``; the context, when drawn, is up to ``max_context`` of the text's
    own word pieces in random order, and is never a target."""
    caption = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # <s> text </s>
    context: list[int] = []
    if rng.random() < context_fraction:
        pieces = list(dict.fromkeys(caption[1:-1]))
        rng.shuffle(pieces)
        context = pieces[:max_context]
    return context + caption, [IGNORE_INDEX] * (len(context) + 1) + caption[1:]


class CaptionTexts(Dataset):
    """Caption strings as training items ``{"text"}`` for ``causal_lm_pretrain``."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "index": index}


class CaptionLMCollator:
    """Items ``{"text", "seed"}`` -> right-padded ``input_ids``, ``attention_mask`` and ``labels`` of
    ``training_row``; each item's context is drawn from its own seed (the Trainer's per-item seed)."""

    def __init__(self, tokenizer, context_fraction: float = CONTEXT_FRACTION, max_context: int = MAX_CONTEXT) -> None:
        self.tokenizer = tokenizer
        self.context_fraction = context_fraction
        self.max_context = max_context

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from blip2.data.collate import pad_token_rows

        rows = [training_row(self.tokenizer, item["text"], random.Random(item.get("seed", index)),
                             self.context_fraction, self.max_context) for index, item in enumerate(items)]
        input_ids, attention_mask, labels = pad_token_rows(rows, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class CausalLMPretrainTask(Task):
    """A plain transformers causal LM (``model=``; ``tokenizer=`` its tokenizer) trained by the Trainer on caption
    text (``train_dataset=CaptionTexts(...)``), with the loss of ``training_row``'s labels. The final ``model/`` folder
    is an ordinary LLM folder (config.json, weights, tokenizer.model) that stage 2 reads as its frozen LLM."""

    name = "causal_lm_pretrain"
    trains = True
    uses_blip2_model = False

    def __init__(self, context_fraction: float = CONTEXT_FRACTION, max_context: int = MAX_CONTEXT) -> None:
        self.context_fraction = context_fraction
        self.max_context = max_context

    def train_collator(self, trainer, dataset_cfg):
        return CaptionLMCollator(trainer.tokenizer, self.context_fraction, self.max_context)

    def training_step(self, model, batch: dict[str, Any], gather) -> dict[str, torch.Tensor]:
        output = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return {"loss": output.loss}

    def save_model(self, trainer, model, directory) -> None:
        """transformers' folder (config.json, model.safetensors) plus the tokenizer's ``tokenizer.model``."""
        directory = Path(directory)
        model.eval().save_pretrained(directory)
        vocab_file = getattr(trainer.tokenizer, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            if Path(vocab_file).resolve() != (directory / "tokenizer.model").resolve():
                shutil.copyfile(vocab_file, directory / "tokenizer.model")
        else:
            trainer.tokenizer.save_pretrained(directory)
