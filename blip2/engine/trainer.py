"""The Trainer: one training loop every task plugs into, plus evaluate() and predict().

``train()`` = set up (device, process group, seed), load or resume, then loop {step, log, save}; a final checkpoint
and ``<output_dir>/model/`` (loadable by ``from_pretrained``) at the end. Under torchrun the model is wrapped in DDP
(or sharded by FSDP2, ``parallel.strategy: fsdp``, with DCP checkpoints), the data is sharded by a seeded sampler,
stage-1 gathers span all ranks, and only rank 0 logs and writes. An elastic restart (torchrun --max-restarts) resumes
from the newest checkpoint by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import random
import signal
import threading
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from blip2.config import Blip2Config
from blip2.engine import checkpoint as ckpt
from blip2.engine import distributed
from blip2.engine.optim import WarmupCosineSchedule, build_optimizer
from blip2.engine.output_dir import check_writable, truncate_log
from blip2.engine import build
from blip2.engine.run_config import DatasetConfig, RunConfig
from blip2.engine.sampler import ResumableDistributedSampler
from blip2.engine.tasks import Task, get_task
from blip2.files import OutputWriteError, check_output_folder

logger = logging.getLogger("blip2")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and each loss part."""


# an item's augmentation seed mixes (run seed, epoch, index) with two primes, so no two of them share a seed
SEED_PRIME = 1_000_003
EPOCH_PRIME = 10_000_019
MIN_ELAPSED_S = 1e-9  # guards the throughput's division


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
            item = dict(item, seed=(self.seed * SEED_PRIME + self.epoch) * EPOCH_PRIME + index)
        return item


_UNBUILT = object()  # a data set the Trainer builds from its config when first used


@contextlib.contextmanager
def defer_interrupts():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until it ends, then raise KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@dataclasses.dataclass(eq=False)
class _TrainRun:
    """One call of ``Trainer.train``: what it built, where it is, and its state after the last completed step (what
    a checkpoint holds, so one saved on Ctrl-C mid-step resumes exactly)."""

    raw_model: torch.nn.Module
    dataset_cfg: DatasetConfig
    batch_size: int
    seeded: "EpochSeeded"  # or a stream (an IterableDataset of tar shards)
    sampler: ResumableDistributedSampler | None  # None: a stream
    batches_per_epoch: int
    total_steps: int
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosineSchedule
    scaler: torch.amp.GradScaler
    collate: Any
    rng: dict[str, Any]  # the RNG state after the last completed step
    gather: Any = dataclasses.field(default_factory=distributed.feature_gather)
    epoch: int = 0  # where the loop is
    batches_done: int = 0
    step_position: tuple[int, int, int] = (0, 0, 0)  # (epoch, batches in it, images skipped) after the last step
    saved_at: int = -1

    def mark_step(self, num_skipped: int) -> None:
        self.step_position = (self.epoch, self.batches_done, num_skipped)
        self.rng = ckpt.rng_state()

    def trainer_state(self, trainer: "Trainer") -> dict[str, Any]:
        """What the JSON-free ``trainer_state.pt`` holds; the optimizer goes to DCP instead under FSDP."""
        epoch, batches, num_skipped = self.step_position
        if batches >= self.batches_per_epoch:
            epoch, batches = epoch + 1, 0
        optimizer = {} if trainer.sharded_checkpoints else {"optimizer": self.optimizer.state_dict()}
        return {**optimizer, "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict(), "step": trainer.global_step, "epoch": epoch,
                "batches_in_epoch": batches, "num_skipped": num_skipped, "config": trainer.config.to_dict()}


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


class _DatasetImage:
    """One image of a data set, loaded when called; ``name`` is its path, or ``image <index>``."""

    def __init__(self, dataset: Dataset, index: int, path: str | None) -> None:
        self.dataset, self.index, self.path = dataset, index, path
        self.name = path if path is not None else f"image {index}"

    def __call__(self):
        if self.path is not None:
            return self.path
        item = self.dataset[self.index]
        if item is None:
            raise ValueError(f"image {self.index} of the data set could not be read")
        return item["image"]


def dataset_images(dataset: Dataset) -> list[_DatasetImage]:
    """Every image of an eval set once, in order: paths where the data set keeps them (caption sets keep one per
    image, class folders one per sample), else the items' images, loaded when called."""
    paths = getattr(dataset, "image_paths", None)
    if paths is None and hasattr(dataset, "samples"):  # ImageFolderDataset: (path, label)
        paths = [path for path, _ in dataset.samples]
    count = len(paths) if paths is not None else len(dataset)
    return [_DatasetImage(dataset, index, str(paths[index]) if paths is not None else None) for index in range(count)]


class Trainer:
    """``Trainer(task=..., model=..., train_dataset=..., eval_dataset=..., config=...)``.

    ``config`` is a ``RunConfig``, a path to a run YAML, a dict, or None (defaults). ``model`` is a model, or a
    preset name or a path that ``from_pretrained`` reads (the seed's ``model="blip2_stage1_vit_g"``); a model not
    given is built from ``config.load_checkpoint``, ``config.model.model_config`` or the preset
    ``config.trainer.model_name``. ``candidate_labels`` and ``hypothesis_template`` are the task's defaults
    (zero-shot classification labels; its label template, or image_to_text_generation's prompt template).

    Data sets are built when first used: ``train()`` builds the train set, ``evaluate()`` the eval set, and
    ``predict()`` none unless it is asked to predict over the eval set's images (no ``input_data``), or needs its
    class names or captions. A run that only predicts therefore never reads the data sets' paths.
    """

    def __init__(self, task: str | Task | None = None, model: torch.nn.Module | str | os.PathLike | None = None,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 config: RunConfig | str | os.PathLike | dict | None = None, tokenizer=None, image_processor=None,
                 candidate_labels: list[str] | tuple[str, ...] | None = None, hypothesis_template: str | None = None,
                 model_name: str | None = None, **overrides: Any) -> None:
        from blip2.config import validate_tree

        if isinstance(config, (str, os.PathLike)):
            config = RunConfig.from_yaml(config)
        elif isinstance(config, dict) or config is None:
            config = RunConfig.from_dict(config or {})
        for key, value in overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"unknown Trainer option {key!r}")
            setattr(config, key, value)
        if task is not None:  # a task name, or a Task object (a task with options of its own)
            config.trainer.type = task.name if isinstance(task, Task) else task
        if model_name is not None:  # the seed's Trainer(..., model_name=preset)
            config.trainer.model_name = model_name
        validate_tree(config)  # a config changed in code is checked as a loaded one is
        self.config = config
        self.task: Task = task if isinstance(task, Task) else get_task(config.trainer.type)
        self.task_options = self._task_options(candidate_labels, hypothesis_template)
        self.device = distributed.pick_device(config.device)
        distributed.init_from_env(self.device)
        self.is_main = distributed.is_main_process()
        setup_logging(self.is_main)
        seed_everything(config.seed)
        self._set_up_model(model)
        self._set_up_processors(tokenizer, image_processor)
        self._train_dataset = _UNBUILT if train_dataset is None else train_dataset
        self._eval_dataset = _UNBUILT if eval_dataset is None else eval_dataset
        self.output_dir = Path(config.output_dir)
        self.global_step = 0
        self.num_skipped = 0

    def _set_up_model(self, model: torch.nn.Module | str | os.PathLike | None) -> None:
        """The model given, or read from a preset name or a path, or built from the config; on the device."""
        if model is None:
            model = build.build_model(self.config, self.task.name)
        elif isinstance(model, (str, os.PathLike)):  # a preset name or a path, as from_pretrained takes them
            model = self._model_class(str(model)).from_pretrained(model)
        elif not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a BLIP-2 model, a preset name or a path; got {type(model).__name__}")
        self.model = model
        self.model.to(self.device)
        self.stage2 = hasattr(distributed.unwrap(self.model), "language_model")
        if self.stage2:
            self.task = get_task(self.config.trainer.type, stage2=True)

    def _set_up_processors(self, tokenizer, image_processor) -> None:
        """The tokenizer (the LLM's in stage 2, else the Q-Former's) and the image processor, given or built."""
        if not self.task.uses_blip2_model:  # a plain transformers model: its tokenizer is given, it reads no images
            if tokenizer is None:
                raise ValueError(f"task {self.task.name!r} needs tokenizer= (the model's own tokenizer)")
            self.tokenizer, self.image_processor = tokenizer, image_processor
            return
        build.check_tokenizer_types(self.config, self.stage2)
        raw_model = distributed.unwrap(self.model)
        if self.stage2:
            self.tokenizer = tokenizer or build.llm_tokenizer(self.config, raw_model, self.model_source)
        else:
            self.tokenizer = tokenizer or build.qformer_tokenizer(self.config, self.model_source)
            build.check_tokenizer_fits(self.tokenizer, self.model_config)
        self.image_processor = image_processor or build.image_processor(self.config, raw_model, self.model_source)

    # --- construction helpers ------------------------------------------------------------------------------------
    def _task_options(self, candidate_labels, hypothesis_template) -> dict[str, Any]:
        """The seed's Trainer keywords: ``candidate_labels`` (zero-shot classification) and ``hypothesis_template``
        (its label template, or image_to_text_generation's prompt template)."""
        options: dict[str, Any] = {}
        if candidate_labels is not None:
            if self.task.name != "zero_shot_image_classification":
                raise ValueError(f"candidate_labels is for zero_shot_image_classification, not {self.task.name}")
            labels = [candidate_labels] if isinstance(candidate_labels, str) else list(candidate_labels)
            if not labels or not all(isinstance(label, str) and label for label in labels):
                raise ValueError(f"candidate_labels must be a non-empty list of strings, got {candidate_labels!r}")
            options["candidate_labels"] = labels
        if hypothesis_template is not None:
            if not isinstance(hypothesis_template, str):
                raise ValueError(f"hypothesis_template must be a string, got {type(hypothesis_template).__name__}")
            options["hypothesis_template"] = hypothesis_template
        return options

    def _model_class(self, source: str | None = None):
        return build.model_class(self.config, self.task.name, source)

    @property
    def model_source(self) -> str | None:
        """Where ``from_pretrained`` read the model (a preset name or a path; ``model.name_or_path``), or None."""
        return getattr(distributed.unwrap(self.model), "name_or_path", None)

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

    @property
    def train_dataset(self) -> Dataset | None:
        """The train set given to the Trainer, else ``config.train_dataset`` built on first use (None: neither)."""
        if self._train_dataset is _UNBUILT:
            self._train_dataset = self._build_dataset(self.config.train_dataset, train=True)
        return self._train_dataset

    @train_dataset.setter
    def train_dataset(self, dataset: Dataset | None) -> None:
        self._train_dataset = dataset

    @property
    def eval_dataset(self) -> Dataset | None:
        """The eval set given to the Trainer, else ``config.eval_dataset`` built on first use (None: neither)."""
        if self._eval_dataset is _UNBUILT:
            self._eval_dataset = self._build_dataset(self.config.eval_dataset, train=False)
        return self._eval_dataset

    @eval_dataset.setter
    def eval_dataset(self, dataset: Dataset | None) -> None:
        self._eval_dataset = dataset

    def has_eval_data(self) -> bool:
        """Whether there is an eval set to use without building anything: one was given, or ``config.eval_dataset``
        names a ``dataset_dir`` that exists. (``blip2 run --run_mode train`` evaluates after training only then.)"""
        if self._eval_dataset is not _UNBUILT:
            return self._eval_dataset is not None
        cfg = self.config.eval_dataset
        return cfg is not None and Path(cfg.data_loader.dataset_dir or ".").expanduser().is_dir()

    @staticmethod
    def _build_dataset(cfg: DatasetConfig | None, train: bool) -> Dataset | None:
        return build.build_dataset(cfg, train)

    def image_collator(self, train: bool):
        from blip2.data import ImageCollator

        return ImageCollator(self.image_processor, train=train)

    def autocast(self):
        """The model's compute-dtype autocast on this trainer's device (none for a model without one)."""
        model = distributed.unwrap(self.model)
        return model.autocast(self.device) if hasattr(model, "autocast") else contextlib.nullcontext()

    # --- training ------------------------------------------------------------------------------------------------
    def train(self, resume: bool | str | None = None) -> dict[str, float]:
        """Train; ``resume=True`` continues from the latest checkpoint in output_dir, a path from that one.

        A fresh run refuses an output_dir that holds another run unless ``config.overwrite``; a finished run resumes to
        a no-op; Ctrl-C saves the state of the last completed step, so resuming equals an uninterrupted run.
        """
        if not self.task.trains:
            raise ValueError(f"task {self.task.name!r} does not train; use evaluate() or predict()")
        if self.train_dataset is None:
            raise ValueError("train() needs a train_dataset (argument or config.train_dataset)")
        runner = self.config.runner_config
        if runner.trains_nothing:
            raise ValueError("runner_config.epochs=0 and max_steps<=0 train nothing: set epochs >= 1, or max_steps "
                             ">= 1 (max_steps 0 or -1 means the epochs decide)")
        resume = self.config.resume if resume is None else resume
        if not resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = True  # torchrun --max-restarts restarted the job: continue from its last checkpoint
            logger.warning("elastic restart %s: resuming from the latest checkpoint in %s",
                           os.environ["TORCHELASTIC_RESTART_COUNT"], self.output_dir)
        self._prepare_output_dir(fresh=not resume)
        run = self._start_run()
        self._resume(run, resume)
        if self.global_step >= run.total_steps:
            logger.info("the run in %s already finished at step %d: nothing to do", self.output_dir, self.global_step)
            return {}
        progress = tqdm(total=run.total_steps, initial=self.global_step, desc="train", disable=not self.is_main,
                        dynamic_ncols=True)
        try:
            self.model.train()
            last_metrics = self._run_epochs(run, progress)
            self._save(run, final=True)
        except KeyboardInterrupt:
            logger.warning("interrupted at step %d: saving a checkpoint before stopping", self.global_step)
            self._save(run)
            raise
        finally:
            progress.close()
        return last_metrics

    def _prepare_output_dir(self, fresh: bool) -> None:
        """output_dir must be a writable folder; a fresh run may not mix with another run's checkpoints (pruning and
        --resume would pick them) unless config.overwrite, which removes that run's checkpoints and log first."""
        problem: Exception | None = None
        if self.is_main:  # rank 0 decides; every rank raises together rather than leave the others waiting
            existing = ckpt.list_checkpoints(self.output_dir)
            try:
                check_writable(self.output_dir)
                check_output_folder(self.output_dir / "model", overwrite=self.config.overwrite)  # written at the end
                if fresh and (existing or (self.output_dir / "model").is_dir()) and not self.config.overwrite:
                    held = f"checkpoints up to {existing[-1].name}" if existing else "a trained model/"
                    raise ValueError(f"output_dir {self.output_dir} already holds a run ({held}): resume it with "
                                     "--resume, start over with --overwrite, or choose another --output_dir")
            except (OSError, ValueError) as error:
                problem = error
        if not distributed.all_true(problem is None):
            raise problem or ValueError(f"output_dir {self.output_dir} cannot take this run (see rank 0's error)")
        if fresh and self.config.overwrite and self.is_main:
            removed = ckpt.remove_run_checkpoints(self.output_dir)
            (self.output_dir / "train_log.jsonl").unlink(missing_ok=True)
            if removed:
                logger.info("overwrite: removed %d checkpoints of the earlier run in %s", len(removed), self.output_dir)
        distributed.barrier()

    def _start_run(self) -> "_TrainRun":
        """Wrap the model, shard the data and build optimizer, schedule and scaler for this run."""
        cfg, runner = self.config, self.config.runner_config
        self.model = distributed.wrap_model(distributed.unwrap(self.model), self.device, cfg.parallel)
        raw_model = distributed.unwrap(self.model)  # FSDP2 shards the model in place: it is its own
        dataset_cfg = cfg.train_dataset or DatasetConfig()
        batch_size = dataset_cfg.batch_size or runner.batch_size
        seeded, sampler, batches_per_epoch = self._train_data(dataset_cfg, batch_size)
        steps_per_epoch = max(1, batches_per_epoch // runner.gradient_accumulation_steps)
        total_steps = runner.max_steps if runner.max_steps > 0 else steps_per_epoch * runner.epochs
        schedule_cfg = cfg.lr_schedule
        optimizer = build_optimizer(raw_model, schedule_cfg.learning_rate, cfg.optimizer.weight_decay,
                                    tuple(cfg.optimizer.betas), cfg.optimizer.eps, cfg.optimizer.vision_lr_scale,
                                    cfg.optimizer.layer_decay)
        schedule = WarmupCosineSchedule(optimizer, schedule_cfg.learning_rate, schedule_cfg.lr_end,
                                        schedule_cfg.warmup_lr_init, schedule_cfg.warmup_steps,
                                        schedule_cfg.total_steps if schedule_cfg.total_steps > 0 else total_steps)
        compute_dtype = getattr(self.model_config, "compute_dtype", None)  # a plain transformers model has none
        use_scaler = self.device.type == "cuda" and compute_dtype == "float16"
        return _TrainRun(raw_model=raw_model, dataset_cfg=dataset_cfg, batch_size=batch_size, seeded=seeded,
                         sampler=sampler, batches_per_epoch=batches_per_epoch, total_steps=total_steps,
                         optimizer=optimizer, schedule=schedule,
                         scaler=torch.amp.GradScaler("cuda", enabled=use_scaler),
                         collate=self.task.train_collator(self, dataset_cfg), rng=ckpt.rng_state())

    def _resume(self, run: "_TrainRun", resume: bool | str) -> None:
        """Load a checkpoint into the model, optimizer, schedule, scaler and position; RNG state last."""
        if resume is True:
            path = ckpt.resumable_checkpoint(self.output_dir)
            if path is None:
                logger.info("no checkpoint in %s: starting from scratch", self.output_dir / "checkpoints")
        else:
            path = Path(resume) if resume else None
            if path is not None and not ckpt.weights_are_finite(path):
                raise ValueError(f"checkpoint {path} holds non-finite weights (NaN or inf): resume from an earlier one")
        if self.is_main:
            self.config.to_yaml(self.output_dir / "run_config.yaml")
        if path is None:
            return
        state = ckpt.load_checkpoint(path, run.raw_model, run.optimizer)
        if "optimizer" in state:
            run.optimizer.load_state_dict(state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
        run.scaler.load_state_dict(state["scaler"])
        self.global_step, run.epoch, run.batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        self.num_skipped = state.get("num_skipped", 0)
        if "rng" in state:
            ckpt.set_rng_state(state["rng"])
        run.mark_step(self.num_skipped)
        if path.parent == self.output_dir / "checkpoints":
            run.saved_at = self.global_step
        if self.is_main:
            truncate_log(self.output_dir / "train_log.jsonl", self.global_step)
        logger.info("resumed from %s at step %d", path, self.global_step)

    # --- the training data: a map-style set with a seeded sampler, or a stream of tar shards ---------------------------
    def _train_data(self, dataset_cfg: DatasetConfig, batch_size: int):
        """(what the loader reads, its sampler (None: a stream), batches per epoch on this rank)."""
        dataset = self.train_dataset
        if isinstance(dataset, IterableDataset):  # tar shards: the stream splits itself over ranks and workers
            if not all(hasattr(dataset, name) for name in ("batches_per_epoch", "set_epoch")):
                raise ValueError(f"an IterableDataset train set needs batches_per_epoch() and set_epoch() (as "
                                 f"blip2.data.shards.ShardedCaptions has); {type(dataset).__name__} lacks them")
            batches = dataset.batches_per_epoch(batch_size, dataset_cfg.drop_remainder, dataset_cfg.num_workers)
            seeded, sampler, items = dataset, None, f"{len(dataset)} items over all processes"
        else:
            seeded = EpochSeeded(dataset, self.config.seed)
            sampler = ResumableDistributedSampler(len(seeded), distributed.world_size(), distributed.rank(),
                                                  shuffle=dataset_cfg.data_loader.shuffle, seed=self.config.seed)
            share = len(sampler)
            batches = share // batch_size if dataset_cfg.drop_remainder else math.ceil(share / batch_size)
            items = f"{len(sampler)} items"
        if batches == 0:
            raise ValueError(f"batch_size={batch_size} is larger than this process's share of the data ({items})")
        return seeded, sampler, batches

    def _stream_loader(self, run: "_TrainRun", epoch: int, skip: int):
        """Tar shards: the stream leaves out the ``skip`` batches already taken (resume) and stops after
        batches_per_epoch, so every rank takes the same number of steps."""
        run.seeded.set_epoch(epoch, skip, run.batch_size, run.dataset_cfg.drop_remainder, seed=self.config.seed)
        loader = DataLoader(run.seeded, batch_size=run.batch_size, collate_fn=run.collate,
                            num_workers=run.dataset_cfg.num_workers, drop_last=run.dataset_cfg.drop_remainder,
                            generator=torch.Generator().manual_seed(self.config.seed + epoch),  # not the global RNG
                            persistent_workers=False, pin_memory=self.device.type == "cuda")
        return itertools.islice(loader, max(0, run.batches_per_epoch - skip))

    def _epoch_loader(self, run: "_TrainRun", epoch: int, skip: int) -> DataLoader:
        if run.sampler is None:
            return self._stream_loader(run, epoch, skip)
        run.seeded.epoch = epoch
        run.sampler.set_epoch(epoch, skip=skip * run.batch_size)
        return DataLoader(run.seeded, batch_size=run.batch_size, sampler=run.sampler, collate_fn=run.collate,
                          num_workers=run.dataset_cfg.num_workers, drop_last=run.dataset_cfg.drop_remainder,
                          generator=torch.Generator().manual_seed(self.config.seed + epoch),
                          persistent_workers=False, pin_memory=self.device.type == "cuda")

    def _run_epochs(self, run: "_TrainRun", progress) -> dict[str, float]:
        """Epochs until total_steps; an epoch that yields no usable batch stops the run (it would spin forever)."""
        runner = self.config.runner_config
        last_metrics: dict[str, float] = {}
        window = {"images": 0, "time": time.perf_counter(), "sums": {}, "count": 0}
        log_path = self.output_dir / "train_log.jsonl"
        first_epoch, skip = run.epoch, run.batches_done
        epochs = runner.epochs if runner.max_steps <= 0 else sys.maxsize
        for epoch in range(first_epoch, epochs):
            run.epoch, run.batches_done = epoch, skip
            usable, pending = 0, 0
            for batch in self._epoch_loader(run, epoch, skip):
                run.batches_done += 1
                if not distributed.all_true(batch is not None):  # every rank takes a step or none does
                    self.num_skipped += run.batch_size if batch is None else 0
                    continue
                usable, pending = usable + 1, pending + 1
                self.num_skipped += int(batch.pop("num_skipped_in_batch", 0))
                sync = pending == runner.gradient_accumulation_steps or run.batches_done == run.batches_per_epoch
                self._micro_step(run, batch, window, sync)
                if not sync:
                    continue
                pending = 0
                self._optimizer_step(run)
                progress.update(1)
                if self.global_step % runner.log_interval == 0 or self.global_step == run.total_steps:
                    last_metrics = self._log(window, run.schedule.get_last_lr(), epoch, log_path, progress)
                if runner.save_steps and self.global_step % runner.save_steps == 0:
                    self._save(run)
                if self.global_step >= run.total_steps:
                    return last_metrics
            if usable == 0 and skip < run.batches_per_epoch:
                raise ValueError(f"epoch {epoch} yielded no usable training batch: all {len(run.seeded)} items were "
                                 f"skipped ({self.num_skipped} skipped in all; unreadable images?)")
            skip = 0
        return last_metrics

    def _micro_step(self, run: "_TrainRun", batch: dict[str, Any], window: dict, sync: bool) -> None:
        """Forward and backward on one batch (gradients synchronised across ranks only when ``sync``)."""
        inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        model = self.model
        no_sync = model.no_sync if (hasattr(model, "no_sync") and not sync) else contextlib.nullcontext
        with no_sync():
            with self.autocast():
                losses = self.task.training_step(model, inputs, run.gather)
            run.scaler.scale(losses["loss"] / self.config.runner_config.gradient_accumulation_steps).backward()
        # one device-to-host read per micro-step serves both the log window and the finiteness check
        values = dict(zip(losses, torch.stack([v.detach().float() for v in losses.values()]).tolist()))
        samples = inputs["pixel_values"] if "pixel_values" in inputs else inputs["input_ids"]
        self._accumulate(window, values, samples.shape[0])
        self._check_finite(values)

    def _optimizer_step(self, run: "_TrainRun") -> None:
        """Clip, step, schedule; a Ctrl-C during it lands after it, so the weights are never half-updated."""
        with defer_interrupts():
            if self.config.runner_config.max_grad_norm:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), self.config.runner_config.max_grad_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.schedule.step()
            self.global_step += 1
            run.mark_step(self.num_skipped)

    def _save(self, run: "_TrainRun", final: bool = False) -> None:
        """Checkpoint the state after the last completed step (once per step); ``final`` also writes model/.
        Non-finite weights are never saved: the run stops, naming the last good checkpoint."""
        if run.saved_at != self.global_step:
            trainable = [getattr(p, "to_local", p.detach)() for p in run.raw_model.parameters() if p.requires_grad]
            if not distributed.all_true(ckpt.all_finite(trainable)):
                last = ckpt.latest_checkpoint(self.output_dir)
                raise NonFiniteLossError(f"the weights are non-finite (NaN or inf) after step {self.global_step}: not "
                                         f"saving them; last good checkpoint: {last or 'none'}")
            path = ckpt.save_checkpoint(self.output_dir, self.global_step, run.raw_model, run.trainer_state(self),
                                        self.config.runner_config.save_total_limit, rng=run.rng,
                                        optimizer=run.optimizer if self.sharded_checkpoints else None)
            run.saved_at = self.global_step
            logger.info("saved checkpoint %s", path)
        if final:  # rank 0 writes; a failure there stops every rank (none is left waiting in a collective)
            error: Exception | None = None
            with distributed.gathered(run.raw_model) as model:  # FSDP2: the whole weights, on rank 0
                if self.is_main:
                    try:
                        self.save_model(model, self.output_dir / "model")
                    except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank
                        error = err
            if not distributed.all_true(error is None):
                raise error or OutputWriteError(f"rank 0 could not write {self.output_dir / 'model'}")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints go through DCP (``parallel.strategy: fsdp``), loadable on any world size."""
        return self.config.parallel.strategy == "fsdp"

    def save_model(self, model, directory: Path) -> None:
        """The model plus what reads its inputs (image settings, vocabulary), so ``pipeline(model=directory)``
        and ``from_pretrained(directory)`` need nothing else (the task's ``save_model``)."""
        self.task.save_model(self, model, directory)

    @staticmethod
    def _accumulate(window: dict, values: dict[str, float], images: int) -> None:
        for name, value in values.items():
            window["sums"][name] = window["sums"].get(name, 0.0) + value
        window["count"] += 1
        window["images"] += images

    def _check_finite(self, values: dict[str, float]) -> None:
        """Stops every rank together (one stopping alone would leave the others waiting in the next collective)."""
        finite = all(math.isfinite(v) for v in values.values())
        if not distributed.all_true(finite):
            parts = ", ".join(f"{name}={value}" for name, value in values.items())
            where = "" if not finite else " on another process"
            raise NonFiniteLossError(f"non-finite loss{where} at step {self.global_step + 1}: {parts}; stopped before "
                                     "the optimizer step")

    def _log(self, window: dict, lr: float, epoch: int, log_path: Path, progress) -> dict[str, float]:
        elapsed = time.perf_counter() - window["time"]
        record = {"step": self.global_step, "epoch": epoch}
        record.update({name: total / max(1, window["count"]) for name, total in window["sums"].items()})
        record["lr"] = lr
        record["img_per_s"] = window["images"] * distributed.world_size() / max(elapsed, MIN_ELAPSED_S)
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
        if self.is_main:  # before the work: a folder we cannot write should not cost an evaluation
            check_writable(self.output_dir)
        metrics = self.task.evaluate(self, **kwargs)
        if self.is_main:
            logger.info("%s: %s", self.task.name, " ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
            with open(self.output_dir / "eval_results.json", "w", encoding="utf-8") as handle:
                json.dump({"task": self.task.name, **metrics}, handle, indent=2)
        return metrics

    def predict(self, input_data=None, batch_size: int | None = None, **kwargs) -> list:
        """Run the task's prediction on images (paths, PIL images or arrays): one result per image.

        Without ``input_data`` it predicts over the eval set's images (the seed's "predict over a data set"), in
        batches of ``batch_size`` (default: the eval batch size); other keywords go to the task (``candidate_labels``,
        ``hypothesis_template``, ``prompt``, generation settings, ...)."""
        if input_data is not None:
            return self.task.predict(self, input_data, **kwargs)
        if self._eval_dataset is _UNBUILT and self.config.eval_dataset is None:
            raise ValueError("predict() needs input_data (image paths, PIL images or arrays), or an eval data set "
                             "whose images to predict (eval_dataset=, config.eval_dataset or --eval_dataset_dir)")
        dataset = self.eval_dataset
        images = dataset_images(dataset)
        size = batch_size or self.eval_batch_size
        results: list = []
        for start in range(0, len(images), size):
            chunk = images[start:start + size]
            for offset, result in enumerate(self.task.predict(self, [image() for image in chunk], **kwargs)):
                if isinstance(result, dict) and "image" in result:  # name the image by its place in the data set
                    result["image"] = chunk[offset].name
                results.append(result)
        return results
