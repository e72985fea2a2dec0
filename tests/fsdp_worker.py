"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 1|2`` (gloo, CPU): FSDP2 stage-2 steps on a fixed
batch, DCP checkpoints written and read back on another world size.

``fsdp_worker.py OUT LLM_DIR step LLM_PLACEMENT``: two steps, then a DCP checkpoint in OUT/run;
``fsdp_worker.py OUT LLM_DIR resume LLM_PLACEMENT SOURCE``: a differently seeded model loads SOURCE's checkpoint,
then takes one more step. Rank 0 writes OUT/result.pt (losses, weights after each phase).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip2 import Blip2ImageToTextGeneration  # noqa: E402
from blip2.engine import checkpoint as ckpt  # noqa: E402
from blip2.engine import distributed  # noqa: E402
from blip2.engine.optim import build_optimizer  # noqa: E402
from blip2.engine.run_config import ParallelConfig  # noqa: E402
from tests.helpers import tiny_config  # noqa: E402

BATCH = 4
STEP = 2


def build(llm_dir: str, llm: str, seed: int, checkpointing: bool = True):
    torch.manual_seed(seed)
    config = tiny_config(text_config={"checkpoint_name_or_path": llm_dir, "seq_length": 40})
    config.qformer_config.hidden_dropout_prob = config.qformer_config.attention_probs_dropout_prob = 0.0
    model = Blip2ImageToTextGeneration(config).train()
    parallel = ParallelConfig(strategy="fsdp", llm=llm, activation_checkpointing=checkpointing)
    model = distributed.wrap_model(model, torch.device("cpu"), parallel)
    return model, build_optimizer(model, 1e-3)


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Every caption the same length (no padding): each rank's mean token loss weighs as in one process."""
    pixel_values = torch.randn(BATCH, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    input_ids = torch.randint(3, 90, (BATCH, 6), generator=torch.Generator().manual_seed(2))
    input_ids[:, 0], input_ids[:, -1] = 1, 2
    return pixel_values, input_ids


def step(model, optimizer) -> float:
    """One optimizer step on this rank's slice of the fixed batch; the loss averaged over ranks."""
    rank, world = distributed.rank(), distributed.world_size()
    pixel_values, input_ids = fixed_batch()
    share = BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    loss = model(pixel_values[rows], input_ids[rows]).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return distributed.all_reduce_sum(loss.detach().clone()).item() / world


def trained_weights(model) -> dict[str, torch.Tensor]:
    state = distributed.full_state_dict(model)  # a collective under FSDP2
    return {key: value.clone() for key, value in state.items() if not key.startswith("language_model.")}


def main(out: Path, llm_dir: str, mode: str, llm: str, source: str | None = None) -> None:
    distributed.init_from_env(torch.device("cpu"))
    result: dict = {"world_size": distributed.world_size()}
    if mode == "step":
        model, optimizer = build(llm_dir, llm, seed=0)
        result["losses"] = [step(model, optimizer) for _ in range(STEP)]
        result["weights"] = trained_weights(model)
        ckpt.save_checkpoint(out / "run", STEP, model, {"step": STEP}, optimizer=optimizer)
    else:
        model, optimizer = build(llm_dir, llm, seed=7)
        state = ckpt.load_checkpoint(ckpt.checkpoint_dir(Path(source) / "run", STEP), model, optimizer)
        result["loaded_step"] = state["step"]
        result["weights"] = trained_weights(model)
        result["losses"] = [step(model, optimizer)]
        result["after"] = trained_weights(model)
    if distributed.is_main_process():
        torch.save(result, out / "result.pt")
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
