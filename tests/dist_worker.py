"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2 import Blip2Qformer  # noqa: E402
from blip2.engine import distributed  # noqa: E402
from blip2.engine.trainer import Trainer  # noqa: E402
from tests.helpers import run_config, text_batch, tiny_config  # noqa: E402


def main(out_dir: Path, data_root: Path) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    result: dict = {"world_size": world}

    torch.manual_seed(0)
    model = Blip2Qformer(tiny_config()).eval()
    pixel_values = torch.randn(4, 3, 30, 30)
    input_ids, attention_mask = text_batch(4, 8, lengths=[8, 5, 6, 7])
    local = slice(rank * 2, rank * 2 + 2)
    out = model(pixel_values[local], input_ids[local], attention_mask[local], gather=distributed.feature_gather())
    out.loss.backward()  # the ITM gather with gradient must run backward across ranks
    loss_itc = out.loss_itc.detach().clone()
    dist.all_reduce(loss_itc)
    result["loss_itc_mean_over_ranks"] = loss_itc.item() / world
    result["query_tokens_grad_finite"] = bool(torch.isfinite(model.query_tokens.grad).all())

    torch.manual_seed(0)
    trainer = Trainer(task="contrastive_language_image_pretrain", model=Blip2Qformer.from_pretrained("blip2_tiny"),
                      config=run_config(data_root, out_dir / "train", max_steps=3, batch_size=4))
    trainer.train()
    result["train_steps"] = trainer.global_step
    result["retrieval"] = Trainer(task="image_to_text_retrieval", model=trainer.model.module,
                                  config=run_config(data_root, out_dir / "eval")).evaluate()
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
