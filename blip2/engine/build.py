"""What a run config builds: the model, the data sets, the Q-Former or LLM tokenizer and the image processor.

The Trainer calls these; each reads the run config (``RunConfig``) and, where it matters, the model and where
``from_pretrained`` read it (``model_source``: a preset name or a path), so that evaluation, prediction and pipelines
read one checkpoint the same way.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from blip2 import registry
from blip2.config import Blip2Config
from blip2.engine.run_config import (DATA_LOADER_TYPES, SHARD_LOADER_TYPE, STAGE1_TOKENIZER_TYPES, STAGE2_ARCHS,
                                     DatasetConfig, RunConfig)

logger = logging.getLogger("blip2")

GENERATION_TASKS = ("image_to_text_generation", "image_to_text_generation_pretrain")
# files that carry no config of their own (a LAVIS checkpoint): the run YAML's model_config describes them
CONFIGLESS_SUFFIXES = (".pth", ".pt", ".bin")


def data_sections(config: RunConfig) -> list[tuple[str, DatasetConfig]]:
    """The run's data set sections that are given, as (name, section)."""
    return [(name, cfg) for name in ("train_dataset", "eval_dataset") if (cfg := getattr(config, name)) is not None]


def vocab_file_of(dataset_cfg: DatasetConfig | None) -> Path | None:
    """The data set section's vocabulary file; a relative path is read from its dataset_dir."""
    if dataset_cfg is None or not dataset_cfg.tokenizer.vocab_file:
        return None
    path = Path(dataset_cfg.tokenizer.vocab_file).expanduser()
    return path if path.is_absolute() else Path(dataset_cfg.data_loader.dataset_dir).expanduser() / path


def given_vocab_files(config: RunConfig) -> list[tuple[str, Path]]:
    return [(name, vocab) for name, cfg in data_sections(config) if (vocab := vocab_file_of(cfg)) is not None]


# --------------------------------------------------------------------------------------------------------- model


def model_class(config: RunConfig, task_name: str, source: str | None = None):
    """Blip2ImageToTextGeneration for the stage-2 arch names (or a config with text_config), else Blip2Qformer.

    Without a ``model`` section, a model named by ``source`` is built as its preset's group or its saved config
    say (a config with text_config is stage 2), else as the task says (image-to-text generation: stage 2)."""
    from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer

    section = config.model
    if section is not None:
        if section.arch_type in STAGE2_ARCHS or section.model_config.text_config is not None:
            return Blip2ImageToTextGeneration
        return Blip2Qformer
    if source is not None:
        if source in registry.PRESETS:
            return Blip2Qformer if registry.PRESETS[source].group == "stage1" else Blip2ImageToTextGeneration
        with contextlib.suppress(FileNotFoundError, ValueError):
            saved = Blip2Config.from_pretrained(source)
            return Blip2Qformer if saved.text_config is None else Blip2ImageToTextGeneration
    return Blip2ImageToTextGeneration if task_name in GENERATION_TASKS else Blip2Qformer


def build_model(config: RunConfig, task_name: str) -> torch.nn.Module:
    """The model of a run config: ``load_checkpoint``, else ``model.model_config`` (from its
    ``checkpoint_name_or_path``, or fresh from the ViT / BERT checkpoints), else the preset ``trainer.model_name``."""
    model_config = config.model.model_config if config.model is not None else None
    start = model_config.checkpoint_name_or_path if model_config else None
    source = config.load_checkpoint or start
    cls = model_class(config, task_name, str(source or config.trainer.model_name or "") or None)
    if source:
        # folders and presets carry their own config and a LAVIS .pth none, so the YAML's serves for a .pth; a start
        # from model_config.checkpoint_name_or_path (stage 2 from a stage-1 model, or fine-tuning a stage-1 model
        # with a trainable ViT or another image size) keeps the YAML's config, which the weights must fit
        carries_config = not str(source).endswith(CONFIGLESS_SUFFIXES)
        use_yaml = not config.load_checkpoint or not carries_config
        return cls.from_pretrained(source, config=model_config if use_yaml else None)
    if model_config is not None:
        model = cls(model_config)
        initialise_from_parts(model, config.model)
        preset = registry.PRESETS.get(config.trainer.model_name or "")
        if model_config.freeze_vision and preset is not None and preset.files and not config.model.vit_checkpoint:
            logger.warning("the frozen ViT has random weights: set model.vit_checkpoint (eva_vit_g.pth) or "
                           "load_checkpoint to start from pretrained weights")
        return model
    if config.trainer.model_name:
        return cls.from_pretrained(config.trainer.model_name)
    raise ValueError("no model: pass model=, or set load_checkpoint, model.model_config or trainer.model_name")


def initialise_from_parts(model, section) -> None:
    """A fresh stage-1 model: the ViT from an EVA checkpoint, the Q-Former from BERT (as LAVIS starts)."""
    from blip2.weights import load_into
    from blip2.weights.bert import init_qformer_from_bert
    from blip2.weights.eva import read_vit_state

    if section.vit_checkpoint:
        state, dropped = read_vit_state(section.vit_checkpoint, model.config)
        load_into(model, state, source=section.vit_checkpoint, allowed_missing=["*"], dropped=dropped)
        logger.info("ViT loaded from %s", section.vit_checkpoint)
    if section.bert_checkpoint:
        report = init_qformer_from_bert(model, section.bert_checkpoint)
        logger.info("Q-Former initialised from %s; %d tensors start fresh", section.bert_checkpoint,
                    len(report.missing))
    model.apply_freezing()


# ------------------------------------------------------------------------------------ tokenizers, image processor


def check_tokenizer_types(config: RunConfig, stage2: bool) -> None:
    """A data set's ``tokenizer.type`` (when given) must be what the model reads: BertTokenizer word pieces for
    the Q-Former (stage 1), the LLM's own tokenizer in stage 2."""
    for name, cfg in data_sections(config):
        kind = cfg.tokenizer.type
        if kind is None:
            continue
        if not stage2 and kind not in STAGE1_TOKENIZER_TYPES:
            raise ValueError(f"{name}.tokenizer.type={kind!r} does not fit a stage-1 model: the Q-Former reads "
                             f"{', '.join(STAGE1_TOKENIZER_TYPES)} word pieces")
        if stage2 and kind in STAGE1_TOKENIZER_TYPES:
            raise ValueError(f"{name}.tokenizer.type={kind!r} does not fit a stage-2 model: it reads the LLM's own "
                             "tokenizer (LlamaTokenizer or AutoTokenizer, read from the LLM's folder)")


def check_tokenizer_fits(tokenizer, config: Blip2Config) -> None:
    """A Q-Former tokenizer must agree with the model's vocabulary size and [DEC] / [SEP] / [PAD] ids."""
    qformer = config.qformer_config
    expected = {"bos_token_id ([DEC])": (tokenizer.bos_token_id, qformer.bos_token_id),
                "sep_token_id ([SEP])": (tokenizer.sep_token_id, qformer.sep_token_id),
                "pad_token_id ([PAD])": (tokenizer.pad_token_id, qformer.pad_token_id)}
    wrong = [f"{name} is {got} in the tokenizer but {want} in qformer_config" for name, (got, want) in expected.items()
             if got is not None and got != want]
    if len(tokenizer) > qformer.vocab_size:
        wrong.append(f"the tokenizer has {len(tokenizer)} tokens but qformer_config.vocab_size is {qformer.vocab_size}")
    if wrong:
        raise ValueError("tokenizer and model do not fit: " + "; ".join(wrong) + " (set tokenizer.vocab_file or "
                         "model_config.qformer_config to match)")


def qformer_tokenizer(config: RunConfig, model_source: str | None):
    """The Q-Former tokenizer: a data set's ``tokenizer.vocab_file`` that exists, else the vocab.txt saved with the
    model (its folder, or its preset's under $BLIP2_HOME), else bert-base-uncased's shipped with blip2."""
    from blip2.processing import load_tokenizer
    from blip2.processing.auto import saved_vocab

    given = given_vocab_files(config)
    for _, vocab in given:
        if vocab.is_file():
            return load_tokenizer(vocab)
    saved = saved_vocab(model_source)
    if given and saved is None:
        name, vocab = given[0]
        raise FileNotFoundError(
            f"tokenizer vocabulary not found: {vocab} ({name}.tokenizer.vocab_file, read from its dataset_dir); "
            "set it to null for the bert-base-uncased vocabulary shipped with blip2 (as "
            "configs/blip2/run_blip2_tiny_own_data.yaml does for your own captions)")
    if given:
        logger.info("%s not found: using the vocabulary saved with the model, %s", given[0][1], saved)
    return load_tokenizer(saved)


def llm_tokenizer(config: RunConfig, model, model_source: str | None):
    """Stage 2: a data set's tokenizer.vocab_file (a tokenizer folder or file) that exists, else the pipeline's
    lookup: the LLM's folder, then the folder the model was read from."""
    from blip2.processing.auto import generation_processor

    given = given_vocab_files(config)
    folder = next((vocab.parent if vocab.is_file() else vocab for _, vocab in given if vocab.exists()), None)
    try:
        return generation_processor(model, model_source, tokenizer=folder).tokenizer
    except FileNotFoundError as error:
        if not given or folder is not None:
            raise
        raise FileNotFoundError(f"{given[0][0]}.tokenizer.vocab_file {given[0][1]} does not exist, and {error}") \
            from None


def image_processor(config: RunConfig, model, model_source: str | None):
    """The image processor saved with the model (its folder's preprocessor_config.json, or its preset's), else
    one from the model's config: evaluation, prediction and pipelines preprocess one checkpoint the same way."""
    from blip2.processing.auto import image_processor_for

    processor = image_processor_for(model, model_source, seed=config.seed)
    size = model.config.vision_config.image_size
    for name, cfg in data_sections(config):
        if cfg.image_size is not None and cfg.image_size != size:
            raise ValueError(f"{name}.image_size={cfg.image_size} but the model reads {size}-pixel images "
                             "(model_config.vision_config.image_size): leave image_size unset or change the "
                             "model's")
    if processor.image_size != size:
        raise ValueError(f"the image processor saved with {model_source} resizes to {processor.image_size} "
                         f"pixels but the model reads {size}-pixel images (vision_config.image_size)")
    return processor


# ------------------------------------------------------------------------------------------------------ data sets


def build_dataset(cfg: DatasetConfig | None, train: bool) -> Dataset | None:
    """The data set a section describes (None: no section)."""
    if cfg is None:
        return None
    from blip2 import data

    loader = cfg.data_loader
    root = str(Path(loader.dataset_dir).expanduser()) if loader.dataset_dir else loader.dataset_dir
    if loader.type == "MultiImgCapDataLoader":
        return data.MultiImgCapDataLoader(
            root, loader.annotation_files, loader.image_dirs,
            stage="train" if train else loader.stage if loader.stage == "eval" else "eval",
            on_error=loader.on_error if train else None, prompt=cfg.text_transforms.prompt,
            max_words=cfg.text_transforms.max_words,
        )
    if loader.type == "ImageFolderDataset":
        return data.ImageFolderDataset(root)
    if loader.type == SHARD_LOADER_TYPE:
        return shard_dataset(cfg, train)
    if loader.type in ("Cifar100DataLoader", "Cifar100Dataset"):
        split = loader.stage if loader.stage in ("train", "test") else "test"
        return data.Cifar100Dataset(root, split=split, fine_label=loader.fine_label)
    raise ValueError(f"unknown data_loader.type {loader.type!r}; available: {', '.join(DATA_LOADER_TYPES)}")


def shard_dataset(cfg: DatasetConfig, train: bool):
    """``data_loader.type: WebDataset``: the shard sets streamed for training (relative paths from dataset_dir);
    the rank and world size come from torch.distributed when the data is read."""
    from blip2.data.shards import ShardedCaptions

    loader = cfg.data_loader
    if not train:
        raise ValueError(f"data_loader.type {SHARD_LOADER_TYPE} streams training data; an eval_dataset needs "
                         "MultiImgCapDataLoader (retrieval evaluation reads every image and caption by index)")
    root = Path(loader.dataset_dir or ".").expanduser()
    return ShardedCaptions([root / Path(path).expanduser() for path in loader.shards], loader.weights,
                           shuffle=loader.shuffle, shuffle_buffer=loader.shuffle_buffer, on_error=loader.on_error,
                           prompt=cfg.text_transforms.prompt, max_words=cfg.text_transforms.max_words)
