"""``blip2 run``: train, evaluate or predict from a run YAML (flags and ``--set`` overrides on top).

    blip2 run --config configs/blip2/run_blip2_quickstart.yaml --run_mode train
    torchrun --nproc_per_node 2 -m blip2 run --config ... --run_mode train
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from blip2.config import ConfigError, set_by_path, validate_tree
from blip2.engine.output_dir import check_writable

logger = logging.getLogger("blip2")


def add_arguments(run: argparse.ArgumentParser) -> None:
    """``blip2 run``'s options."""
    run.add_argument("--config", required=True, help="run YAML (configs/blip2/...)")
    run.add_argument("--run_mode", choices=("train", "eval", "predict"), help="overrides the YAML's run_mode")
    run.add_argument("--train_dataset_dir", help="replaces train_dataset.data_loader.dataset_dir")
    run.add_argument("--eval_dataset_dir", help="replaces eval_dataset.data_loader.dataset_dir")
    run.add_argument("--predict_data", nargs="+", help="images (files or folders) for --run_mode predict; without "
                     "it, predict runs over the eval data set's images (e.g. with --eval_dataset_dir)")
    run.add_argument("--prompt", help="image_to_text_generation predict: the prompt, or the question that the "
                     "config's hypothesis_template (e.g. 'Question: {} Answer:') wraps")
    run.add_argument("--load_checkpoint", help="weights: a preset, our folder, a Hugging Face folder, a LAVIS .pth")
    run.add_argument("--output_dir")
    run.add_argument("--device", choices=("cpu", "cuda", "auto"))
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    run.add_argument("--overwrite", action="store_true",
                     help="train: start over in an output_dir that holds an earlier run (its checkpoints, log and "
                     "model/ are replaced); without it such a folder is refused")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                     help="override any config key (repeatable), e.g. runner_config.batch_size=16")


def image_paths(items: list[str]) -> list[str]:
    from blip2.data.classification import IMAGE_EXTENSIONS

    paths: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            paths.append(str(path))
        else:
            raise FileNotFoundError(f"--predict_data: {path} does not exist")
    if not paths:
        raise FileNotFoundError(f"--predict_data: no images found in {', '.join(items)}")
    return paths


def load_run_config(args: argparse.Namespace):
    """The YAML, then the flags, then ``--set`` overrides, all applied to the same dataclasses."""
    from blip2.engine.run_config import DatasetConfig, RunConfig

    config = RunConfig.from_yaml(args.config)
    if args.run_mode:
        config.run_mode = args.run_mode
    for flag, section in (("train_dataset_dir", "train_dataset"), ("eval_dataset_dir", "eval_dataset")):
        value = getattr(args, flag)
        if value:
            if getattr(config, section) is None:
                setattr(config, section, DatasetConfig())
            getattr(config, section).data_loader.dataset_dir = value
    for flag in ("load_checkpoint", "output_dir", "device"):
        if getattr(args, flag):
            setattr(config, flag, getattr(args, flag))
    if args.resume:
        config.resume = True
    if args.overwrite:
        config.overwrite = True
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"--set {override!r}: expected KEY.SUB=VALUE")
        set_by_path(config, key.strip(), value)
    validate_tree(config)  # once, after every override: values that only fit together are judged together
    return config


def cmd_run(args: argparse.Namespace) -> int:
    from blip2.engine.trainer import Trainer

    config = load_run_config(args)
    if config.run_mode == "predict" and args.predict_data:
        images = image_paths(args.predict_data)  # before building the model: a wrong path fails fast
    elif config.run_mode == "predict":
        images = None
        if config.eval_dataset is None:
            raise ValueError("--run_mode predict needs --predict_data IMAGE [IMAGE ...], or an eval data set whose "
                             "images to predict (--eval_dataset_dir, or eval_dataset in the config)")
    trainer = Trainer(config=config)
    if config.run_mode == "predict" and trainer.is_main:
        check_writable(trainer.output_dir)  # predictions.json goes there: a folder we cannot write fails first
    if config.run_mode == "train":
        # evaluate after training only with an eval set at hand: --eval_dataset_dir, or the config's dataset_dir when
        # it exists (a config's example path such as ./data/coco is skipped, saying so); built now, so a wrong
        # annotation path fails before training rather than after it
        evaluate = bool(args.eval_dataset_dir) or trainer.has_eval_data()
        if evaluate:
            trainer.eval_dataset  # noqa: B018 -- builds the eval set
        elif config.eval_dataset is not None:
            logger.info("no evaluation after training: eval_dataset.data_loader.dataset_dir %s does not exist "
                        "(give --eval_dataset_dir)", config.eval_dataset.data_loader.dataset_dir)
        trainer.train()
        if evaluate:
            trainer.evaluate()
    elif config.run_mode == "eval":
        trainer.evaluate()
    else:
        options = {}
        if args.prompt is not None:
            if trainer.task.name not in ("image_to_text_generation", "image_to_text_generation_pretrain"):
                raise ValueError(f"--prompt is for image_to_text_generation; this config's task is {trainer.task.name}")
            options["prompt"] = args.prompt
        predictions = trainer.predict(input_data=images, **options)
        if trainer.is_main:
            trainer.output_dir.mkdir(parents=True, exist_ok=True)
            (trainer.output_dir / "predictions.json").write_text(json.dumps(predictions, indent=2) + "\n")
            print(json.dumps(predictions, indent=2))
    return 0
