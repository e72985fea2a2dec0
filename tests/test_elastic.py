"""Issue 12: elastic training. Under ``torchrun --max-restarts 1`` one rank dies (os._exit) right after the step-2
checkpoint; torchrun restarts the job, the Trainer resumes from that checkpoint on its own (TORCHELASTIC_RESTART_COUNT
> 0) and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers import shapes_data

WORKER = Path(__file__).with_name("train_worker.py")


def run(out: Path, data_root: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--max-restarts", "1", str(WORKER), str(out), str(data_root), "ddp", *extra]
    completed = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                               timeout=300)
    errors = "\n".join(line for line in completed.stderr.splitlines() if "Error" in line)
    assert completed.returncode == 0, errors[-3000:] or completed.stderr[-3000:]
    return completed


def test_killed_rank_restarts_resumes_and_reaches_the_uninterrupted_weights(tmp_path):
    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=10)
    run(tmp_path / "whole", data.root)
    killed = run(tmp_path / "killed", data.root, "2")
    assert "exitcode: 17" in killed.stderr  # rank 1 did die in the first attempt
    assert "elastic restart 1: resuming" in killed.stderr and "resumed from" in killed.stderr
    assert "checkpoints/step_00000002 at step 2" in killed.stderr
    assert (tmp_path / "killed" / "finished.txt").read_text() == "4 2"
    whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
