"""Run by tests/test_fsdp.py under torchrun (gloo, CPU), or as one plain process: stage-2 training through the
Trainer with the run config in CONFIG_JSON. ``fsdp_trainer_worker.py CONFIG_JSON [MAX_STEPS]``: with MAX_STEPS the
run resumes from the newest checkpoint in its output_dir and trains on to that step."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2.engine import distributed  # noqa: E402
from blip2.engine.trainer import Trainer  # noqa: E402


def main(config_path: str, max_steps: str | None = None) -> None:
    config = json.loads(Path(config_path).read_text())
    if max_steps is not None:
        config["runner_config"]["max_steps"] = int(max_steps)
    torch.manual_seed(0)
    trainer = Trainer(config=config)
    trainer.train(resume=max_steps is not None)
    if distributed.is_main_process():
        (Path(config["output_dir"]) / "finished.txt").write_text(f"{trainer.global_step} {distributed.world_size()}")
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
