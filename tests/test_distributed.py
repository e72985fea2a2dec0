"""Data parallel on CPU: two gloo processes under torchrun agree with one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from blip2 import Blip2Qformer
from blip2.engine.trainer import Trainer
from tests.helpers import run_config, shapes_data, text_batch, tiny_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=10)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(Path(__file__).with_name("dist_worker.py")), str(tmp_path), str(data.root)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2

    torch.manual_seed(0)
    model = Blip2Qformer(tiny_config()).eval()
    pixel_values = torch.randn(4, 3, 30, 30)
    input_ids, attention_mask = text_batch(4, 8, lengths=[8, 5, 6, 7])
    single = model(pixel_values, input_ids, attention_mask)
    assert abs(result["loss_itc_mean_over_ranks"] - single.loss_itc.item()) < 1e-5
    assert result["query_tokens_grad_finite"] and result["train_steps"] == 3

    # the trained weights are written by rank 0; one process evaluating them must give the same metrics
    trained = Blip2Qformer.from_pretrained(tmp_path / "train" / "model")
    metrics = Trainer(task="image_to_text_retrieval", model=trained,
                      config=run_config(data.root, tmp_path / "eval1")).evaluate()
    for key, value in metrics.items():
        assert abs(result["retrieval"][key] - value) < 1e-6, key
