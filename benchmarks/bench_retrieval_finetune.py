"""Retrieval fine-tuning on the shapes data (several captions per image): r_mean of a stage-1 start, then of the same
start trained further (a) by plain stage-1 pretraining and (b) by ``image_text_retrieval_finetune`` (same-image
positives, trainable ViT with a lower learning rate and layer-wise decay, gradient checkpointing), same steps.

    python benchmarks/bench_retrieval_finetune.py                  # ~5 minutes on 2 CPU cores
    python benchmarks/bench_retrieval_finetune.py --start_steps 300 --finetune_steps 200

Prints a table: run, steps, r_mean, txt_r1, img_r1, seconds. CPU training here is not bit-deterministic run to run.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from blip2 import Blip2Qformer
from blip2.data import generate_shapes_dataset
from blip2.engine.run_config import RunConfig
from blip2.engine.trainer import Trainer
from blip2.resources import config_file

QUICKSTART = "run_blip2_quickstart.yaml"


def base_config(data_root: Path, output_dir: Path, steps: int, task: str) -> RunConfig:
    config = RunConfig.from_yaml(config_file(QUICKSTART))
    config.output_dir = str(output_dir)
    config.device = "cpu"
    config.trainer.type = task
    config.train_dataset.data_loader.dataset_dir = str(data_root)
    config.eval_dataset.data_loader.dataset_dir = str(data_root)
    config.runner_config.max_steps = steps
    config.runner_config.save_steps = 0
    return config


def run(name: str, config: RunConfig, model=None) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    trainer = Trainer(config=config, model=model)
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    return {"run": name, "steps": config.runner_config.max_steps, "r_mean": metrics["r_mean"],
            "txt_r1": metrics["txt_r1"], "img_r1": metrics["img_r1"], "seconds": seconds, "trainer": trainer}


def finetune_model(start_dir: Path) -> Blip2Qformer:
    """The start model with a trainable ViT (gradient checkpointing on)."""
    config = copy.deepcopy(Blip2Qformer.from_pretrained(start_dir).config)
    config.freeze_vision = False
    config.vision_config.use_grad_checkpoint = True
    return Blip2Qformer.from_pretrained(start_dir, config=config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_train", type=int, default=600, help="training images (3 captions each)")
    parser.add_argument("--num_test", type=int, default=100)
    parser.add_argument("--start_steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--finetune_lr", type=float, default=2e-4)
    parser.add_argument("--vision_lr_scale", type=float, default=0.1)
    parser.add_argument("--layer_decay", type=float, default=0.9)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate_shapes_dataset(root / "shapes", num_train=args.num_train, num_test=args.num_test,
                                       captions_per_image=3, seed=0)
        rows = [run("stage-1 start", base_config(data.root, root / "start", args.start_steps,
                                                 "contrastive_language_image_pretrain"))]
        print(f"done: stage-1 start: r_mean {rows[0]['r_mean']:.2f}", flush=True)
        start_dir = root / "start" / "model"
        for name, task in (("+ stage-1 pretraining (frozen ViT)", "contrastive_language_image_pretrain"),
                           ("+ retrieval fine-tuning (image_id positives, ViT trained)",
                            "image_text_retrieval_finetune")):
            config = base_config(data.root, root / task, args.finetune_steps, task)
            config.lr_schedule.learning_rate = args.finetune_lr
            config.lr_schedule.lr_end = args.finetune_lr / 10
            config.lr_schedule.warmup_steps = 0
            model = Blip2Qformer.from_pretrained(start_dir)
            if task == "image_text_retrieval_finetune":
                config.optimizer.vision_lr_scale = args.vision_lr_scale
                config.optimizer.layer_decay = args.layer_decay
                model = finetune_model(start_dir)
            rows.append(run(name, config, model))
            print(f"done: {rows[-1]['run']}: r_mean {rows[-1]['r_mean']:.2f}", flush=True)
    print(f"\nshapes data: {args.num_train} train images x 3 captions, {args.num_test} test images x 3 captions; "
          f"fine-tune lr {args.finetune_lr}, ViT x{args.vision_lr_scale}, layer decay {args.layer_decay}\n")
    print(f"| {'run':<58} | steps | r_mean | txt_r1 | img_r1 | seconds |")
    print(f"|{'-' * 60}|-------|--------|--------|--------|---------|")
    for row in rows:
        print(f"| {row['run']:<58} | {row['steps']:>5} | {row['r_mean']:6.2f} | {row['txt_r1']:6.2f} | "
              f"{row['img_r1']:6.2f} | {row['seconds']:7.1f} |")


if __name__ == "__main__":
    main()
