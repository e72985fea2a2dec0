"""Shared plain helpers (import them: ``from tests.helpers import tiny_config``): tiny odd-sized configs, token
batches, generated data sets, small run configs. The shared pytest fixtures are all in ``conftest.py``; the tiny LLM
folders are built by ``llm_fixtures.py`` and the tiny transformers BLIP-2 models by ``weights_fixtures.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from blip2.config import Blip2Config, QformerConfig, ViTConfig
from blip2.data import generate_shapes_dataset


def tiny_config(freeze_vision: bool = True, **overrides) -> Blip2Config:
    """Tiny odd-sized stage-1 config, so a swapped axis shows up as a shape error."""
    vision = ViTConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    qformer = QformerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                            query_length=5, vocab_size=120, max_position_embeddings=40, bos_token_id=119,
                            sep_token_id=102, pad_token_id=0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, embed_dim=24, max_txt_len=16,
                       freeze_vision=freeze_vision, **overrides)


def text_batch(batch: int, length: int, vocab: int = 100, lengths: list[int] | None = None, seed: int = 0):
    """[CLS] w w ... [SEP] [PAD]...: input_ids and attention_mask (B, L)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [length] * batch
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, size in enumerate(lengths):
        input_ids[row, 0] = 101
        input_ids[row, 1 : size - 1] = torch.randint(1, vocab, (size - 2,), generator=generator)
        input_ids[row, size - 1] = 102
        attention_mask[row, :size] = 1
    return input_ids, attention_mask


class WritesAFile:
    """Unpickling this creates ``marker``: what a crafted file or checkpoint would do with a real payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


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
