"""The run configuration: one YAML file (the seed's layout) mapped one-to-one onto dataclasses.

Sections: trainer (task + preset name), model (model_config = Blip2Config, arch), train_dataset / eval_dataset
(data_loader, text_transforms, tokenizer), runner_config, optimizer, lr_schedule, parallel. Unknown keys are errors
naming the key; ``--set a.b=c`` overrides go through ``blip2.config.set_by_path`` onto the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blip2.config import Blip2Config, ConfigError, _ConfigBase

RUN_MODES = ("train", "eval", "predict")


@dataclass
class DataLoaderConfig(_ConfigBase):
    type: str = "MultiImgCapDataLoader"  # or ImageFolderDataset, Cifar100DataLoader
    dataset_dir: str = ""
    annotation_files: list[str] = field(default_factory=list)
    image_dirs: list[str] = field(default_factory=list)
    stage: str = "train"  # train | eval (captions); train | test (CIFAR-100 split)
    shuffle: bool = True
    on_error: str = "skip"  # an unreadable training image: skip and count, or raise
    fine_label: bool = True  # CIFAR-100: fine (100) or coarse (20) labels
    hypothesis_template: str | None = None  # zero-shot classification prompt, e.g. "a picture of {}"

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"data_loader.on_error={self.on_error!r} must be 'skip' or 'raise'")


@dataclass
class TextTransformConfig(_ConfigBase):
    type: str = "CaptionTransform"
    prompt: str = ""
    max_words: int = 50
    max_length: int = 32


@dataclass
class TokenizerConfig(_ConfigBase):
    type: str = "BertTokenizer"
    max_length: int = 32
    # None: the bert-base-uncased vocabulary shipped with the package; a relative path is read from the data set's
    # dataset_dir, like the annotation files (the generated shapes data carries its own trimmed vocab.txt)
    vocab_file: str | None = None
    padding: str = "max_length"


@dataclass
class DatasetConfig(_ConfigBase):
    """One data set section of a run YAML (``train_dataset`` / ``eval_dataset``)."""

    data_loader: DataLoaderConfig = field(default_factory=DataLoaderConfig)
    text_transforms: TextTransformConfig = field(default_factory=TextTransformConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    batch_size: int | None = None  # None: runner_config.batch_size
    num_workers: int = 2
    drop_remainder: bool = True
    k_test: int = 128  # retrieval: ITC candidates re-ranked by ITM
    add_extra_itm_score: bool = True  # retrieval: add the ITM score to the ITC similarity
    candidate_labels: list[str] | None = None  # classification: default the data set's class names
    image_size: int | None = None  # None: the model's vision_config.image_size
    augment: bool = True  # training images: random resized crop (scale 0.5-1) + horizontal flip, as LAVIS

    _nested = {"data_loader": DataLoaderConfig, "text_transforms": TextTransformConfig,
               "tokenizer": TokenizerConfig}

    def __post_init__(self) -> None:
        for name, cls in self._nested.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls.from_dict(getattr(self, name), where=name))


@dataclass
class ModelSection(_ConfigBase):
    model_config: Blip2Config = field(default_factory=Blip2Config)
    arch: dict[str, Any] = field(default_factory=lambda: {"type": "Blip2Qformer"})
    # fresh stage-1 training starts from these (the seed's vit_g_p16 and bert_base_uncased checkpoints)
    vit_checkpoint: str | None = None  # EVA eva_vit_g.pth
    bert_checkpoint: str | None = None  # a Hugging Face bert-base-uncased folder: initialises the Q-Former

    _nested = {"model_config": Blip2Config}

    def __post_init__(self) -> None:
        if isinstance(self.model_config, dict):
            self.model_config = Blip2Config.from_dict(self.model_config, where="model.model_config")


@dataclass
class TrainerSection(_ConfigBase):
    type: str = "contrastive_language_image_pretrain"  # the task
    model_name: str | None = None  # a preset name: its config and weights when model.model_config is absent


@dataclass
class RunnerConfig(_ConfigBase):
    epochs: int = 1
    batch_size: int = 8  # per process
    max_steps: int = -1  # stop after this many optimizer steps (-1: epochs decide)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    log_interval: int = 10
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2
    eval_batch_size: int | None = None


@dataclass
class OptimizerConfig(_ConfigBase):
    type: str = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05


@dataclass
class LrScheduleConfig(_ConfigBase):
    type: str = "cosine"
    learning_rate: float = 1e-4
    lr_end: float = 1e-5
    warmup_lr_init: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = -1  # -1: derived from epochs and the data set


@dataclass
class ParallelConfig(_ConfigBase):
    backend: str | None = None  # None: gloo on CPU, nccl on GPU (only used under torchrun)
    gradients_mean: bool = True


@dataclass
class RunConfig(_ConfigBase):
    seed: int = 42
    run_mode: str = "train"
    output_dir: str = "./output"
    load_checkpoint: str | None = None  # weights to start from: a preset, our folder, an HF folder, a LAVIS .pth
    resume: bool = False  # continue from the latest checkpoint in output_dir
    device: str = "auto"  # auto | cpu | cuda
    trainer: TrainerSection = field(default_factory=TrainerSection)
    model: ModelSection | None = None
    train_dataset: DatasetConfig | None = None
    eval_dataset: DatasetConfig | None = None
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    _nested = {"trainer": TrainerSection, "model": ModelSection, "train_dataset": DatasetConfig,
               "eval_dataset": DatasetConfig, "runner_config": RunnerConfig, "optimizer": OptimizerConfig,
               "lr_schedule": LrScheduleConfig, "parallel": ParallelConfig}

    def __post_init__(self) -> None:
        for name, cls in self._nested.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls.from_dict(getattr(self, name), where=name))
        if self.run_mode not in RUN_MODES:
            raise ConfigError(f"run_mode={self.run_mode!r} must be one of {', '.join(RUN_MODES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a run YAML; relative paths inside stay as written (the caller's working directory decides)."""
        return cls.from_yaml(path)
