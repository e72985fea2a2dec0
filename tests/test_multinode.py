"""Issue 12: multi-node training, as 2 "nodes" x 2 CPU processes on loopback (two torchrun invocations, gloo). The
result equals one node running 4 processes: same ranks, same data shards, same final weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import shapes_data
from tests.test_distributed import free_port

WORKER = Path(__file__).with_name("train_worker.py")


def torchrun(*options: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]


def test_two_nodes_of_two_processes_equal_one_node_of_four(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=10)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    port = str(free_port())
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "2",
                                       "--master_addr", "127.0.0.1", "--master_port", port, str(WORKER),
                                       str(tmp_path / "nodes"), str(data.root), "ddp"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    finish(nodes)
    single = subprocess.Popen(torchrun("--standalone", "--nproc_per_node", "4", str(WORKER), str(tmp_path / "single"),
                                       str(data.root), "ddp"),
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finish([single])
    assert (tmp_path / "nodes" / "finished.txt").read_text() == "4 4"
    assert (tmp_path / "single" / "finished.txt").read_text() == "4 4"
    on_nodes = load_file(tmp_path / "nodes" / "model" / "model.safetensors")
    on_one = load_file(tmp_path / "single" / "model" / "model.safetensors")
    assert on_nodes.keys() == on_one.keys()
    for key, value in on_one.items():
        torch.testing.assert_close(on_nodes[key], value, atol=1e-6, rtol=0, msg=key)
