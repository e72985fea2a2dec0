"""Run by tests/test_sharded_eval.py: retrieval evaluation of a tiny model, under ``torchrun --nproc_per_node 2``
(gloo, CPU) or as one plain process; writes the metrics and how many images and texts this process encoded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2 import Blip2Qformer  # noqa: E402
from blip2.engine import distributed  # noqa: E402
from blip2.engine.trainer import Trainer  # noqa: E402
from tests.helpers import run_config  # noqa: E402


def count_rows(model, name: str, counts: dict, key: str) -> None:
    """Wrap ``model.<name>`` so that the rows of its first argument are added to ``counts[key]``."""
    original = getattr(model, name)

    def counted(inputs, *args, **kwargs):
        counts[key] += inputs.shape[0]
        return original(inputs, *args, **kwargs)

    setattr(model, name, counted)


def main(out_dir: Path, data_root: Path) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny").eval()
    counts = {"images": 0, "texts": 0}
    count_rows(model, "encode_image", counts, "images")
    count_rows(model, "get_text_features", counts, "texts")
    config = run_config(data_root, out_dir / f"eval_{world}", eval_batch_size=3)
    config["eval_dataset"]["k_test"] = 7
    trainer = Trainer(task="image_to_text_retrieval", model=model, config=config)
    metrics = trainer.evaluate()
    result = {"world_size": world, "metrics": metrics, "counted": counts, "reported": trainer.task.last_encoded}
    (out_dir / f"result_{world}_{rank}.json").write_text(json.dumps(result))
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
