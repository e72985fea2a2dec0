"""Run by tests/test_multinode.py and tests/test_elastic.py under torchrun (gloo, CPU): a few Trainer steps of the
tiny stage-1 model; rank 0's trained weights end in OUT/model.

``train_worker.py OUT DATA_ROOT STRATEGY [KILL_STEP]``: with KILL_STEP, rank 1 of the first attempt
(TORCHELASTIC_RESTART_COUNT 0) ends itself with os._exit right after the checkpoint of that step is written, as a
crashed node would; torchrun --max-restarts then restarts every worker, and the Trainer resumes from that checkpoint.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2 import Blip2Qformer  # noqa: E402
from blip2.engine import checkpoint as ckpt  # noqa: E402
from blip2.engine import distributed  # noqa: E402
from blip2.engine import trainer as trainer_module  # noqa: E402
from tests.helpers import run_config  # noqa: E402

STEPS = 4


def die_after(kill_step: int):
    """``save_checkpoint`` that ends rank 1 of the first attempt once the checkpoint of ``kill_step`` is complete."""
    save = ckpt.save_checkpoint

    def saving(output_dir, step, *args, **kwargs):
        path = save(output_dir, step, *args, **kwargs)
        if step == kill_step and distributed.rank() == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os._exit(17)
        return path

    return saving


def main(out: Path, data_root: Path, strategy: str, kill_step: str | None = None) -> None:
    if kill_step is not None:
        trainer_module.ckpt.save_checkpoint = die_after(int(kill_step))
    config = run_config(data_root, out, max_steps=STEPS, batch_size=2, save_steps=1, save_total_limit=0)
    config["parallel"] = {"strategy": strategy}
    torch.manual_seed(0)
    trainer = trainer_module.Trainer(task="contrastive_language_image_pretrain",
                                     model=Blip2Qformer.from_pretrained("blip2_tiny"), config=config)
    trainer.train()
    if distributed.is_main_process():
        (out / "finished.txt").write_text(f"{trainer.global_step} {distributed.world_size()}")
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:])
