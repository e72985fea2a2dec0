"""A tiny model really learns on generated image-caption pairs."""

from __future__ import annotations

import json

import torch

from blip2 import Blip2Qformer
from blip2.engine.trainer import Trainer
from tests.helpers import run_config, shapes_data


def test_tiny_model_halves_its_loss_within_200_steps(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=100, num_test=8, captions_per_image=2)  # 200 pairs
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny")
    config = run_config(data.root, tmp_path / "run", max_steps=200, batch_size=16, log_interval=20)
    Trainer(task="contrastive_language_image_pretrain", model=model, config=config).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    first, last = log[0]["loss"], log[-1]["loss"]
    assert log[-1]["step"] == 200
    assert last <= first / 2, f"total loss went from {first:.3f} to {last:.3f}: not halved"
    assert log[-1]["loss_lm"] < log[0]["loss_lm"] and log[-1]["loss_itc"] < log[0]["loss_itc"]
