"""The Trainer: one training loop every task plugs into, plus evaluate() and predict().

``train()`` = set up (device, process group, seed), load or resume, then loop {step, log, save}; a final checkpoint
and ``<output_dir>/model/`` (loadable by ``from_pretrained``) at the end. Under torchrun the model is wrapped in DDP,
the data is sharded by a seeded sampler, stage-1 gathers span all ranks, and only rank 0 logs and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from blip2.config import Blip2Config
from blip2.engine import checkpoint as ckpt
from blip2.engine import distributed
from blip2.engine.optim import WarmupCosineSchedule, build_optimizer
from blip2.engine.run_config import DatasetConfig, RunConfig
from blip2.engine.sampler import ResumableDistributedSampler
from blip2.engine.tasks import Task, get_task

logger = logging.getLogger("blip2")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and each loss part."""


class EpochSeeded(Dataset):
    """Gives every item an augmentation seed from (run seed, epoch, index), so crops and flips do not depend on
    worker count or on where a run was resumed."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is not None:
            item = dict(item, seed=(self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
        return item


STAGE1_ARCHS = ("Blip2Qformer", "Blip2Classifier", "Blip2ItmEvaluator")
STAGE2_ARCHS = ("Blip2ImageToTextGeneration", "Blip2Llm")


def vocab_file_of(dataset_cfg: DatasetConfig | None) -> Path | None:
    """The data set section's vocabulary file; a relative path is read from its dataset_dir."""
    if dataset_cfg is None or not dataset_cfg.tokenizer.vocab_file:
        return None
    path = Path(dataset_cfg.tokenizer.vocab_file).expanduser()
    return path if path.is_absolute() else Path(dataset_cfg.data_loader.dataset_dir) / path


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners and notebooks swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(is_main: bool) -> None:
    """Show the library's INFO lines when nobody configured logging; defer to the application's set-up otherwise."""
    if not logger.handlers and not logging.getLogger().handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)


class Trainer:
    """``Trainer(task=..., model=..., train_dataset=..., eval_dataset=..., config=...)``.

    ``config`` is a ``RunConfig``, a path to a run YAML, a dict, or None (defaults). A model not given is built
    from ``config.load_checkpoint``, ``config.model.model_config`` or the preset ``config.trainer.model_name``.
    """

    def __init__(self, task: str | None = None, model: torch.nn.Module | None = None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 config: RunConfig | str | os.PathLike | dict | None = None, tokenizer=None, image_processor=None,
                 **overrides: Any) -> None:
        if isinstance(config, (str, os.PathLike)):
            config = RunConfig.from_yaml(config)
        elif isinstance(config, dict) or config is None:
            config = RunConfig.from_dict(config or {})
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"unknown Trainer option {key!r}")
            setattr(config, key, value)
        if task is not None:
            config.trainer.type = task
        self.config = config
        self.task: Task = get_task(config.trainer.type)
        self.device = self._pick_device(config.device)
        distributed.init_from_env(self.device)
        self.is_main = distributed.is_main_process()
        setup_logging(self.is_main)
        seed_everything(config.seed)
        self.model = model if model is not None else self._build_model()
        self.model.to(self.device)
        from blip2.processing import Blip2ImageProcessor, load_tokenizer

        dataset_cfg = config.train_dataset or config.eval_dataset
        self.stage2 = hasattr(distributed.unwrap(self.model), "language_model")
        if self.stage2:
            self.task = get_task(config.trainer.type, stage2=True)
            self.tokenizer = tokenizer or self._llm_tokenizer(dataset_cfg)
        else:
            self.tokenizer = tokenizer or load_tokenizer(vocab_file_of(dataset_cfg) or self._checkpoint_vocab())
            check_tokenizer_fits(self.tokenizer, self.model_config)
        image_size = (dataset_cfg.image_size if dataset_cfg and dataset_cfg.image_size else
                      self.model_config.vision_config.image_size)
        self.image_processor = image_processor or Blip2ImageProcessor(image_size=image_size, seed=config.seed)
        self.train_dataset = train_dataset if train_dataset is not None else self._build_dataset(config.train_dataset,
                                                                                                 train=True)
        self.eval_dataset = eval_dataset if eval_dataset is not None else self._build_dataset(config.eval_dataset,
                                                                                              train=False)
        self.output_dir = Path(config.output_dir)
        self.global_step = 0
        self.num_skipped = 0

    # --- construction helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _pick_device(name: str) -> torch.device:
        if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise RuntimeError("device=cuda was asked for but no CUDA device is available")
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")

    def _model_class(self):
        """Blip2ImageToTextGeneration for the stage-2 arch names (or a config with text_config), else Blip2Qformer."""
        from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer

        section = self.config.model
        arch = (section.arch or {}).get("type", "Blip2Qformer") if section is not None else "Blip2Qformer"
        if arch in STAGE2_ARCHS or (section is not None and section.model_config.text_config is not None):
            return Blip2ImageToTextGeneration
        if arch not in STAGE1_ARCHS:
            raise ValueError(f"unknown model.arch.type {arch!r}; available: {', '.join(STAGE1_ARCHS + STAGE2_ARCHS)}")
        return Blip2Qformer

    def _build_model(self) -> torch.nn.Module:
        from blip2 import registry

        cfg = self.config
        model_class = self._model_class()
        model_config = cfg.model.model_config if cfg.model is not None else None
        start = model_config.checkpoint_name_or_path if model_config else None
        source = cfg.load_checkpoint or start
        if source:
            # folders and presets carry their own config and a LAVIS .pth none, so the YAML's serves for a .pth; and
            # stage 2 starting from model_config.checkpoint_name_or_path (a stage-1 model) keeps the YAML's config
            carries_config = not str(source).endswith((".pth", ".pt", ".bin"))
            stage2_start = not cfg.load_checkpoint and model_class.preset_group != "stage1"
            use_yaml = stage2_start or not carries_config
            return model_class.from_pretrained(source, config=model_config if use_yaml else None)
        if model_config is not None:
            model = model_class(model_config)
            self._initialise_from_parts(model)
            preset = registry.PRESETS.get(cfg.trainer.model_name or "")
            if model_config.freeze_vision and preset is not None and preset.files and not cfg.model.vit_checkpoint:
                logger.warning("the frozen ViT has random weights: set model.vit_checkpoint (eva_vit_g.pth) or "
                               "load_checkpoint to start from pretrained weights")
            return model
        if cfg.trainer.model_name:
            return model_class.from_pretrained(cfg.trainer.model_name)
        raise ValueError("no model: pass model=, or set load_checkpoint, model.model_config or trainer.model_name")

    def _initialise_from_parts(self, model) -> None:
        """A fresh stage-1 model: the ViT from an EVA checkpoint, the Q-Former from BERT (as LAVIS starts)."""
        from blip2.weights import load_into
        from blip2.weights.bert import init_qformer_from_bert
        from blip2.weights.eva import read_vit_state

        section = self.config.model
        if section.vit_checkpoint:
            state, dropped = read_vit_state(section.vit_checkpoint, model.config)
            load_into(model, state, source=section.vit_checkpoint, allowed_missing=["*"], dropped=dropped)
            logger.info("ViT loaded from %s", section.vit_checkpoint)
        if section.bert_checkpoint:
            report = init_qformer_from_bert(model, section.bert_checkpoint)
            logger.info("Q-Former initialised from %s; %d tensors start fresh", section.bert_checkpoint,
                        len(report.missing))
        model.apply_freezing()

    def _llm_tokenizer(self, dataset_cfg: DatasetConfig | None):
        """Stage 2: tokenizer.vocab_file (a tokenizer folder or file), else the pipeline's lookup: the LLM's folder,
        then the load_checkpoint folder."""
        from blip2.pipelines import generation_processor

        given = vocab_file_of(dataset_cfg)
        folder = (given.parent if given.is_file() else given) if given is not None else None
        return generation_processor(distributed.unwrap(self.model), self.config.load_checkpoint,
                                    tokenizer=folder).tokenizer

    def _checkpoint_vocab(self) -> Path | None:
        """The vocab.txt saved beside the model that load_checkpoint names, if any."""
        source = self.config.load_checkpoint
        vocab = Path(source) / "vocab.txt" if source else None
        return vocab if vocab is not None and vocab.is_file() else None

    @property
    def model_config(self) -> Blip2Config:
        return distributed.unwrap(self.model).config

    @property
    def text_max_length(self) -> int:
        cfg = self.config.eval_dataset or self.config.train_dataset
        return cfg.tokenizer.max_length if cfg else self.model_config.max_txt_len

    @property
    def eval_batch_size(self) -> int:
        runner = self.config.runner_config
        cfg = self.config.eval_dataset
        return runner.eval_batch_size or (cfg.batch_size if cfg and cfg.batch_size else runner.batch_size)

    def _build_dataset(self, cfg: DatasetConfig | None, train: bool) -> Dataset | None:
        if cfg is None:
            return None
        from blip2 import data

        loader = cfg.data_loader
        if loader.type == "MultiImgCapDataLoader":
            return data.MultiImgCapDataLoader(
                loader.dataset_dir, loader.annotation_files, loader.image_dirs,
                stage="train" if train else loader.stage if loader.stage == "eval" else "eval",
                on_error=loader.on_error if train else None, prompt=cfg.text_transforms.prompt,
                max_words=cfg.text_transforms.max_words,
            )
        if loader.type == "ImageFolderDataset":
            return data.ImageFolderDataset(loader.dataset_dir)
        if loader.type in ("Cifar100DataLoader", "Cifar100Dataset"):
            split = loader.stage if loader.stage in ("train", "test") else "test"
            return data.Cifar100Dataset(loader.dataset_dir, split=split, fine_label=loader.fine_label)
        raise ValueError(f"unknown data_loader.type {loader.type!r}; available: MultiImgCapDataLoader, "
                         "ImageFolderDataset, Cifar100DataLoader")

    def image_collator(self, train: bool):
        from blip2.data import ImageCollator

        return ImageCollator(self.image_processor, train=train)

    def autocast(self):
        """The model's compute-dtype autocast on this trainer's device."""
        return distributed.unwrap(self.model).autocast(self.device)

    # --- training ------------------------------------------------------------------------------------------------
    def train(self, resume: bool | str | None = None) -> dict[str, float]:
        """Train; ``resume=True`` continues from the latest checkpoint in output_dir, a path from that one."""
        if not self.task.trains:
            raise ValueError(f"task {self.task.name!r} does not train; use evaluate() or predict()")
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset (argument or config.train_dataset)")
        cfg, runner = self.config, self.config.runner_config
        resume = cfg.resume if resume is None else resume
        raw_model = distributed.unwrap(self.model)
        model = distributed.wrap_model(raw_model, self.device)
        self.model = model
        gather = distributed.feature_gather()
        world, rank = distributed.world_size(), distributed.rank()

        dataset_cfg = cfg.train_dataset or DatasetConfig()
        batch_size = dataset_cfg.batch_size or runner.batch_size
        seeded = EpochSeeded(self.train_dataset, cfg.seed)
        sampler = ResumableDistributedSampler(len(seeded), world, rank, shuffle=dataset_cfg.data_loader.shuffle,
                                              seed=cfg.seed)
        batches_per_epoch = len(sampler) // batch_size if dataset_cfg.drop_remainder else math.ceil(
            len(sampler) / batch_size)
        if batches_per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} is larger than this process's share of the data "
                             f"({len(sampler)} items)")
        steps_per_epoch = max(1, batches_per_epoch // runner.gradient_accumulation_steps)
        total_steps = runner.max_steps if runner.max_steps > 0 else steps_per_epoch * runner.epochs
        schedule_cfg = cfg.lr_schedule
        optimizer = build_optimizer(raw_model, schedule_cfg.learning_rate, cfg.optimizer.weight_decay,
                                    tuple(cfg.optimizer.betas), cfg.optimizer.eps)
        schedule = WarmupCosineSchedule(optimizer, schedule_cfg.learning_rate, schedule_cfg.lr_end,
                                        schedule_cfg.warmup_lr_init, schedule_cfg.warmup_steps,
                                        schedule_cfg.total_steps if schedule_cfg.total_steps > 0 else total_steps)
        use_scaler = self.device.type == "cuda" and self.model_config.compute_dtype == "float16"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

        start_epoch, skip_batches = 0, 0
        resume_path = ckpt.latest_checkpoint(self.output_dir) if resume is True else (Path(resume) if resume else None)
        if resume is True and resume_path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.output_dir / "checkpoints")
        if resume_path is not None:
            state = ckpt.load_checkpoint(resume_path, raw_model)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            self.global_step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_in_epoch"]
            self.num_skipped = state.get("num_skipped", 0)
            if "rng" in state:
                ckpt.set_rng_state(state["rng"])
            logger.info("resumed from %s at step %d", resume_path, self.global_step)

        collate = self.task.train_collator(self, dataset_cfg)
        log_path = self.output_dir / "train_log.jsonl"
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.config.to_yaml(self.output_dir / "run_config.yaml")
        progress = tqdm(total=total_steps, initial=self.global_step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        window = {"images": 0, "time": time.perf_counter(), "sums": {}, "count": 0}
        last_metrics: dict[str, float] = {}

        saved_at = [-1]

        def save(final: bool = False) -> None:
            if saved_at[0] == self.global_step and not final:
                return
            state = {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                     "scaler": scaler.state_dict(), "step": self.global_step, "epoch": epoch,
                     "batches_in_epoch": batches_done, "num_skipped": self.num_skipped,
                     "config": self.config.to_dict()}
            if batches_done >= batches_per_epoch:
                state["epoch"], state["batches_in_epoch"] = epoch + 1, 0
            if saved_at[0] != self.global_step:
                path = ckpt.save_checkpoint(self.output_dir, self.global_step, raw_model, state,
                                            runner.save_total_limit)
                saved_at[0] = self.global_step
                logger.info("saved checkpoint %s", path)
            if final and self.is_main:
                self.save_model(raw_model, self.output_dir / "model")

        epoch, batches_done = start_epoch, skip_batches
        try:
            model.train()
            for epoch in range(start_epoch, runner.epochs if runner.max_steps <= 0 else 10**9):
                seeded.epoch = epoch
                skip = skip_batches if epoch == start_epoch else 0
                sampler.set_epoch(epoch, skip=skip * batch_size)
                loader = DataLoader(seeded, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                    num_workers=dataset_cfg.num_workers, drop_last=dataset_cfg.drop_remainder,
                                    generator=torch.Generator().manual_seed(cfg.seed + epoch),
                                    persistent_workers=False, pin_memory=self.device.type == "cuda")
                batches_done = skip
                for batch in loader:
                    batches_done += 1
                    if batch is None:
                        self.num_skipped += batch_size
                        continue
                    self.num_skipped += int(batch.pop("num_skipped_in_batch", 0))
                    micro = (batches_done - skip) % runner.gradient_accumulation_steps
                    sync = micro == 0 or batches_done == batches_per_epoch
                    inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                              if isinstance(v, torch.Tensor)}
                    no_sync = model.no_sync if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext
                    with no_sync():
                        with self.autocast():
                            losses = self.task.training_step(model, inputs, gather)
                        scaler.scale(losses["loss"] / runner.gradient_accumulation_steps).backward()
                    # one device-to-host read per micro-step serves both the log window and the finiteness check
                    values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
                    self._accumulate(window, values, inputs["pixel_values"].shape[0])
                    if not sync:
                        continue
                    self._check_finite(values)
                    if runner.max_grad_norm:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), runner.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    self.global_step += 1
                    progress.update(1)
                    if self.global_step % runner.log_interval == 0 or self.global_step == total_steps:
                        last_metrics = self._log(window, schedule.get_last_lr(), epoch, log_path, progress)
                    if runner.save_steps and self.global_step % runner.save_steps == 0:
                        save()
                    if self.global_step >= total_steps:
                        break
                if self.global_step >= total_steps:
                    break
            save(final=True)
        except KeyboardInterrupt:
            logger.warning("interrupted at step %d: saving a checkpoint before stopping", self.global_step)
            save()
            raise
        finally:
            progress.close()
        return last_metrics

    def save_model(self, model, directory: Path) -> None:
        """The model plus what reads its inputs (image settings, vocabulary), so ``pipeline(model=directory)``
        and ``from_pretrained(directory)`` need nothing else."""
        from blip2.processing import Blip2Processor

        model.save_pretrained(directory)
        if not self.stage2:  # a stage-2 folder refers to its LLM's folder, which holds the tokenizer
            Blip2Processor(self.image_processor, self.tokenizer, self.text_max_length).save_pretrained(directory)

    @staticmethod
    def _accumulate(window: dict, values: dict[str, float], images: int) -> None:
        for name, value in values.items():
            window["sums"][name] = window["sums"].get(name, 0.0) + value
        window["count"] += 1
        window["images"] += images

    def _check_finite(self, values: dict[str, float]) -> None:
        if not all(math.isfinite(v) for v in values.values()):
            parts = ", ".join(f"{name}={value}" for name, value in values.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step + 1}: {parts}; stopped before the "
                                     "optimizer step")

    def _log(self, window: dict, lr: float, epoch: int, log_path: Path, progress) -> dict[str, float]:
        elapsed = time.perf_counter() - window["time"]
        record = {"step": self.global_step, "epoch": epoch}
        record.update({name: total / max(1, window["count"]) for name, total in window["sums"].items()})
        record["lr"] = lr
        record["img_per_s"] = window["images"] * distributed.world_size() / max(elapsed, 1e-9)
        record["skipped_images"] = self.num_skipped
        window.update(images=0, time=time.perf_counter(), sums={}, count=0)
        if self.is_main:
            progress.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", lr=f"{lr:.2e}")
            parts = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss"))
            logger.info("step %d epoch %d %s lr=%.3e img/s=%.1f skipped=%d", self.global_step, epoch, parts, lr,
                        record["img_per_s"], self.num_skipped)
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        return record

    # --- evaluation and prediction -------------------------------------------------------------------------------
    def evaluate(self, **kwargs) -> dict[str, float]:
        """Run the task's evaluation; rank 0 writes ``<output_dir>/eval_results.json``."""
        metrics = self.task.evaluate(self, **kwargs)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            path = self.output_dir / "eval_results.json"
            with open(path, "w", encoding="utf-8") as handle:
                json.dump({"task": self.task.name, **metrics}, handle, indent=2)
            logger.info("%s: %s", self.task.name, " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        return metrics

    def predict(self, input_data=None, **kwargs) -> list:
        """Run the task's prediction on images (paths, PIL images or arrays)."""
        if input_data is None:
            raise ValueError("predict() needs input_data (image paths, PIL images or arrays)")
        return self.task.predict(self, input_data, **kwargs)
