"""The run configuration: one YAML file (the seed's layout) mapped one-to-one onto dataclasses.

Sections: trainer (task + preset name), model (model_config = Blip2Config, arch), train_dataset / eval_dataset
(data_loader, text_transforms, tokenizer), runner_config, optimizer, lr_schedule, parallel. Unknown keys are errors
naming the key; ``--set a.b=c`` overrides go through ``blip2.config.set_by_path`` onto the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from blip2.config import Blip2Config, ConfigBase, ConfigError

RUN_MODES = ("train", "eval", "predict")
# the names each ``type`` key accepts (the seed's names first); anything else is an error naming these
DATA_LOADER_TYPES = ("MultiImgCapDataLoader", "ImageFolderDataset", "Cifar100DataLoader", "Cifar100Dataset",
                     "WebDataset")
SHARD_LOADER_TYPE = "WebDataset"  # tar shards written by `blip2 shard`, streamed (training only)
TEXT_TRANSFORM_TYPES = ("CaptionTransform",)
# BertTokenizer: the Q-Former's WordPiece (stage 1); LlamaTokenizer / AutoTokenizer: the LLM's own tokenizer (stage 2)
TOKENIZER_TYPES = ("BertTokenizer", "LlamaTokenizer", "AutoTokenizer")
STAGE1_TOKENIZER_TYPES = ("BertTokenizer",)
PADDING = ("max_length", "longest")
STAGE1_ARCHS = ("Blip2Qformer", "Blip2Classifier", "Blip2ItmEvaluator")
STAGE2_ARCHS = ("Blip2ImageToTextGeneration", "Blip2Llm")
# AdamW with decoupled weight decay is the only optimizer: MindFormers calls it AdamWeightDecay
OPTIMIZER_TYPES = ("adamw", "AdamW", "AdamWeightDecay")
# linear warm-up then cosine decay to lr_end is the only schedule: MindFormers calls it CosineWithWarmUpLR
LR_SCHEDULE_TYPES = ("cosine", "CosineWithWarmUpLR")
PARALLEL_STRATEGIES = ("ddp", "fsdp")
LLM_PLACEMENTS = ("replicate", "shard")


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not supported; valid: {', '.join(valid)}")


@dataclass
class DataLoaderConfig(ConfigBase):
    type: str = "MultiImgCapDataLoader"  # or ImageFolderDataset, Cifar100DataLoader (see DATA_LOADER_TYPES)
    dataset_dir: str = ""
    annotation_files: list[str] = field(default_factory=list)
    image_dirs: list[str] = field(default_factory=list)
    stage: str = "train"  # train | eval (captions); train | test (CIFAR-100 split)
    shuffle: bool = True
    on_error: str = "skip"  # an unreadable training image: skip and count, or raise
    fine_label: bool = True  # CIFAR-100: fine (100) or coarse (20) labels
    hypothesis_template: str | None = None  # zero-shot classification prompt, e.g. "a picture of {}"
    # type WebDataset: shard-set folders (each with the manifest.json `blip2 shard` writes; relative paths are read
    # from dataset_dir); several with weights: a resampled weighted mix; shuffle_buffer: items in the shuffle buffer
    shards: list[str] = field(default_factory=list)
    weights: list[float] | None = None
    shuffle_buffer: int = 1000

    def validate(self) -> None:
        _check_choice("data_loader.type", self.type, DATA_LOADER_TYPES)
        if self.on_error not in ("skip", "raise"):
            raise ConfigError(f"data_loader.on_error={self.on_error!r} must be 'skip' or 'raise'")
        self._check_shards()

    def _check_shards(self) -> None:
        if self.type != SHARD_LOADER_TYPE:
            if self.shards or self.weights is not None:
                raise ConfigError(f"data_loader.shards and data_loader.weights are read only by type "
                                  f"{SHARD_LOADER_TYPE}, not {self.type}")
            return
        if not self.shards or not isinstance(self.shards, list):
            raise ConfigError(f"data_loader.type {SHARD_LOADER_TYPE} needs data_loader.shards: a list of shard-set "
                              "folders written by `blip2 shard`")
        if self.weights is not None and (not isinstance(self.weights, list) or len(self.weights) != len(self.shards)
                                         or not all(isinstance(w, (int, float)) and w > 0 for w in self.weights)):
            raise ConfigError(f"data_loader.weights={self.weights!r} must be one positive number per shard set "
                              f"({len(self.shards)})")
        _check_at_least("data_loader", 0, shuffle_buffer=self.shuffle_buffer)


@dataclass
class TextTransformConfig(ConfigBase):
    type: str = "CaptionTransform"  # clean_caption (LAVIS blip_caption) with the prompt and word limit below
    prompt: str = ""
    max_words: int = 50
    # the seed's second name for tokenizer.max_length (the token ids' length): when given it must agree with it
    max_length: int | None = None

    def validate(self) -> None:
        _check_choice("text_transforms.type", self.type, TEXT_TRANSFORM_TYPES)


@dataclass
class TokenizerConfig(ConfigBase):
    # None: what the model reads (BertTokenizer for stage 1, the LLM's own for stage 2); given, it must fit the model
    type: str | None = None
    max_length: int = 32
    # None: the bert-base-uncased vocabulary shipped with the package; a relative path is read from the data set's
    # dataset_dir, like the annotation files (the generated shapes data carries its own trimmed vocab.txt)
    vocab_file: str | None = None
    padding: str = "max_length"

    def validate(self) -> None:
        if self.type is not None:
            _check_choice("tokenizer.type", self.type, TOKENIZER_TYPES)
        _check_choice("tokenizer.padding", self.padding, PADDING)


@dataclass
class DatasetConfig(ConfigBase):
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
    # None: the model's vision_config.image_size, which is the only size it reads (a different one is refused by the
    # Trainer; images of another size need the model methods' interpolate_pos_encoding=True)
    image_size: int | None = None
    augment: bool = True  # training images: random resized crop (scale 0.5-1) + horizontal flip, as LAVIS

    nested: ClassVar[dict[str, type]] = {"data_loader": DataLoaderConfig, "text_transforms": TextTransformConfig,
                                         "tokenizer": TokenizerConfig}

    def validate(self) -> None:
        given = self.text_transforms.max_length
        if given is not None and given != self.tokenizer.max_length:
            raise ConfigError(
                f"text_transforms.max_length={given} but tokenizer.max_length={self.tokenizer.max_length}: both "
                "name the token ids' length; give them the same value (or leave text_transforms.max_length out)"
            )

    def check_numbers(self, owner: str) -> None:
        _check_at_least(owner, 1, batch_size=self.batch_size, k_test=self.k_test, image_size=self.image_size)
        _check_at_least(owner, 0, num_workers=self.num_workers)


@dataclass
class ModelSection(ConfigBase):
    model_config: Blip2Config = field(default_factory=Blip2Config)
    arch: dict[str, Any] = field(default_factory=lambda: {"type": "Blip2Qformer"})
    # fresh stage-1 training starts from these (the seed's vit_g_p16 and bert_base_uncased checkpoints)
    vit_checkpoint: str | None = None  # EVA eva_vit_g.pth
    bert_checkpoint: str | None = None  # a Hugging Face bert-base-uncased folder: initialises the Q-Former

    nested: ClassVar[dict[str, type]] = {"model_config": Blip2Config}
    section_name: ClassVar[str] = "model"

    def validate(self) -> None:
        if not isinstance(self.arch, dict) or set(self.arch) - {"type"}:
            keys = sorted(self.arch) if isinstance(self.arch, dict) else self.arch
            raise ConfigError(f"model.arch={keys!r}: only 'type' is read (one of "
                              f"{', '.join(STAGE1_ARCHS + STAGE2_ARCHS)})")
        _check_choice("model.arch.type", self.arch.get("type", "Blip2Qformer"), STAGE1_ARCHS + STAGE2_ARCHS)

    @property
    def arch_type(self) -> str:
        return self.arch.get("type", "Blip2Qformer")


@dataclass
class TrainerSection(ConfigBase):
    type: str = "contrastive_language_image_pretrain"  # the task
    model_name: str | None = None  # a preset name: its config and weights when model.model_config is absent


def _check_at_least(owner: str, minimum: int, **values: int | float | None) -> None:
    """Each value (None: not set, allowed) must be a number >= minimum; the error names the key."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum):
            raise ConfigError(f"{owner}.{name}={value!r} must be a number >= {minimum}")


@dataclass
class RunnerConfig(ConfigBase):
    epochs: int = 1
    batch_size: int = 8  # per process
    max_steps: int = -1  # stop after this many optimizer steps; 0 or -1: epochs decide
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    log_interval: int = 10
    save_steps: int = 0  # 0: only at the end
    save_total_limit: int = 2  # checkpoints kept (0: all)
    eval_batch_size: int | None = None

    def validate(self) -> None:
        _check_at_least("runner_config", 1, batch_size=self.batch_size, log_interval=self.log_interval,
                        gradient_accumulation_steps=self.gradient_accumulation_steps,
                        eval_batch_size=self.eval_batch_size)
        _check_at_least("runner_config", 0, epochs=self.epochs, save_steps=self.save_steps,
                        save_total_limit=self.save_total_limit)
        _check_at_least("runner_config", -1, max_steps=self.max_steps)
        if self.max_grad_norm is not None:
            _check_at_least("runner_config", 0, max_grad_norm=self.max_grad_norm)

    @property
    def trains_nothing(self) -> bool:
        """epochs=0 with no max_steps: zero optimizer steps in all."""
        return self.max_steps <= 0 and self.epochs == 0


@dataclass
class OptimizerConfig(ConfigBase):
    type: str = "adamw"  # AdamW (OPTIMIZER_TYPES: the seed's AdamWeightDecay is the same optimizer)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.05
    # a trainable ViT (model_config.freeze_vision: false): its lr is learning_rate * vision_lr_scale, times
    # layer_decay ** (layers + 1 - layer) per block (the paper's retrieval fine-tuning of ViT-g: 0.95)
    vision_lr_scale: float = 1.0
    layer_decay: float = 1.0

    def validate(self) -> None:
        _check_choice("optimizer.type", self.type, OPTIMIZER_TYPES)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"optimizer.betas={self.betas!r} must be two numbers [beta1, beta2]")
        for key in ("vision_lr_scale", "layer_decay"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"optimizer.{key}={value!r} must be a number in (0, 1]")


@dataclass
class LrScheduleConfig(ConfigBase):
    type: str = "cosine"  # linear warm-up, then cosine to lr_end (LR_SCHEDULE_TYPES)
    learning_rate: float = 1e-4
    lr_end: float = 1e-5
    warmup_lr_init: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = -1  # -1: derived from epochs and the data set

    def validate(self) -> None:
        _check_choice("lr_schedule.type", self.type, LR_SCHEDULE_TYPES)


@dataclass
class ParallelConfig(ConfigBase):
    """The seed's ``parallel`` section. Under torchrun the Trainer runs data parallel over a 1-D device mesh of
    ``data_parallel`` processes (NCCL on GPU, gloo on CPU), gradients averaged over processes. ``strategy``: ``ddp``
    (replicas) or ``fsdp`` (FSDP2 ``fully_shard``; checkpoints through ``torch.distributed.checkpoint``); ``llm``:
    under fsdp, whether the frozen LLM is sharded (``shard``) or kept whole on every process (``replicate``);
    ``activation_checkpointing``: recompute the LLM blocks' activations in the backward pass."""

    gradients_mean: bool = True
    data_parallel: int = -1  # -1: world size / model_parallel
    model_parallel: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    llm: str = "replicate"  # shard | replicate (fsdp only)
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.gradients_mean is not True:
            raise ConfigError(f"parallel.gradients_mean={self.gradients_mean!r} is not supported: data-parallel "
                              "training averages gradients over processes (scale learning_rate to change the step)")
        _check_choice("parallel.strategy", self.strategy, PARALLEL_STRATEGIES)
        _check_choice("parallel.llm", self.llm, LLM_PLACEMENTS)
        if self.model_parallel != 1:
            raise ConfigError(f"parallel.model_parallel={self.model_parallel!r} is not supported: only data "
                              "parallel (model_parallel: 1) is implemented; use strategy: fsdp with llm: shard to "
                              "spread a large LLM over processes")
        if not isinstance(self.data_parallel, int) or isinstance(self.data_parallel, bool) or (
                self.data_parallel < 1 and self.data_parallel != -1):
            raise ConfigError(f"parallel.data_parallel={self.data_parallel!r} must be a positive number of processes "
                              "or -1 (the world size)")
        if not isinstance(self.activation_checkpointing, bool):
            raise ConfigError(f"parallel.activation_checkpointing={self.activation_checkpointing!r} must be true or "
                              "false")

    def data_parallel_size(self, world_size: int) -> int:
        """The data-parallel mesh size for ``world_size`` processes; one line when the config disagrees."""
        expected = world_size // self.model_parallel
        if self.data_parallel not in (-1, expected):
            raise ConfigError(f"parallel.data_parallel={self.data_parallel} but {world_size} processes were launched "
                              f"(model_parallel={self.model_parallel}): set data_parallel to {expected} or -1")
        return expected


@dataclass
class RunConfig(ConfigBase):
    seed: int = 42
    run_mode: str = "train"
    output_dir: str = "./output"
    load_checkpoint: str | None = None  # weights to start from: a preset, our folder, an HF folder, a LAVIS .pth
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # a fresh run may replace the run (checkpoints, model/) already in output_dir
    device: str = "auto"  # auto | cpu | cuda
    trainer: TrainerSection = field(default_factory=TrainerSection)
    model: ModelSection | None = None
    train_dataset: DatasetConfig | None = None
    eval_dataset: DatasetConfig | None = None
    runner_config: RunnerConfig = field(default_factory=RunnerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    nested: ClassVar[dict[str, type]] = {
        "trainer": TrainerSection, "model": ModelSection, "train_dataset": DatasetConfig,
        "eval_dataset": DatasetConfig, "runner_config": RunnerConfig, "optimizer": OptimizerConfig,
        "lr_schedule": LrScheduleConfig, "parallel": ParallelConfig,
    }

    def validate(self) -> None:
        for name in ("train_dataset", "eval_dataset"):
            if getattr(self, name) is not None:
                getattr(self, name).check_numbers(name)
        if self.run_mode not in RUN_MODES:
            raise ConfigError(f"run_mode={self.run_mode!r} must be one of {', '.join(RUN_MODES)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        self._check_prompt()

    def _check_prompt(self) -> None:
        """The seed's ``model_config.prompt`` (whether, or which, fixed prompt stage-2 training puts before every
        caption) must agree with ``train_dataset.text_transforms.prompt``, the prompt the data set applies."""
        if self.model is None or self.train_dataset is None:
            return
        declared, used = self.model.model_config.prompt, self.train_dataset.text_transforms.prompt
        if declared == "" or declared is None:  # not declared
            return
        if isinstance(declared, bool):
            if declared != bool(used):
                raise ConfigError(
                    f"model.model_config.prompt={declared} but train_dataset.text_transforms.prompt={used!r}: "
                    + ("set the prompt text in text_transforms.prompt" if declared else
                       "set model_config.prompt to true (or to the prompt text)"))
            return
        if not isinstance(declared, str):
            raise ConfigError(f"model.model_config.prompt={declared!r} must be a string or true/false")
        if declared != used:
            raise ConfigError(f"model.model_config.prompt={declared!r} but train_dataset.text_transforms.prompt="
                              f"{used!r}: the model's prompt is the one its training captions start with; make them "
                              "the same")

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        """Read a run YAML; relative paths inside stay as written (the caller's working directory decides)."""
        return cls.from_yaml(path)
