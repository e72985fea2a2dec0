"""Test helpers: generated data sets and small run configs (not collected by pytest)."""

from __future__ import annotations

from pathlib import Path

from blip2.data import generate_shapes_dataset


def shapes_data(root: Path, num_train: int = 60, num_test: int = 24, image_size: int = 32, seed: int = 0,
                captions_per_image: int = 2, images_per_class: int = 4):
    return generate_shapes_dataset(root, num_train=num_train, num_test=num_test, image_size=image_size, seed=seed,
                                   captions_per_image=captions_per_image, images_per_class=images_per_class)


def run_config(data_dir: Path, output_dir: Path, max_steps: int = 20, batch_size: int = 8, num_workers: int = 0,
               learning_rate: float = 1e-3, **runner) -> dict:
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "train_dataset": {
            "data_loader": {"dataset_dir": str(data_dir), "annotation_files": ["annotations/train.json"],
                            "image_dirs": ["images"]},
            "num_workers": num_workers, "batch_size": batch_size, "tokenizer": {"padding": "longest"},
        },
        "eval_dataset": {
            "data_loader": {"dataset_dir": str(data_dir), "annotation_files": ["annotations/test.json"],
                            "image_dirs": ["images"], "stage": "eval"},
            "num_workers": 0, "batch_size": 16, "tokenizer": {"max_length": 35},
        },
        "runner_config": {"max_steps": max_steps, "log_interval": 5, **runner},
        "lr_schedule": {"learning_rate": learning_rate, "lr_end": learning_rate / 10, "warmup_steps": 5,
                        "warmup_lr_init": 1e-5},
    }
