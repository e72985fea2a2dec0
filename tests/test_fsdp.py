"""Issue 12: FSDP2 stage 2 on CPU (gloo). Two processes give one process's loss and updated weights; a DCP checkpoint
written by two processes resumes on one and one written by one resumes on two; the parallel section's checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip2.config import ConfigError
from blip2.engine.run_config import ParallelConfig, RunConfig
from tests.test_distributed import free_port

WORKER = Path(__file__).with_name("fsdp_worker.py")
ATOL = 1e-5


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=90, hidden_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    folder = tmp_path_factory.mktemp("llm")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def launch(out: Path, nproc: int, *args: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), str(WORKER), str(out), *args]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out / "result.pt", weights_only=True)


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys() and any(key.startswith("qformer.") for key in first)
    return max((first[key] - second[key]).abs().max().item() for key in first)


def test_fsdp2_matches_one_process_and_dcp_resumes_on_another_world_size(llm_dir, tmp_path):
    one = launch(tmp_path / "one", 1, str(llm_dir), "step", "shard")
    two = launch(tmp_path / "two", 2, str(llm_dir), "step", "shard")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert all(abs(a - b) < ATOL for a, b in zip(one["losses"], two["losses"])), (one["losses"], two["losses"])
    assert one["losses"][1] != one["losses"][0]  # the step changed the weights
    assert largest_difference(one["weights"], two["weights"]) < ATOL
    assert (tmp_path / "two" / "run" / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()

    # the two-process checkpoint on one process; the one-process checkpoint on two (the LLM kept whole there)
    from_two = launch(tmp_path / "from_two", 1, str(llm_dir), "resume", "shard", str(tmp_path / "two"))
    from_one = launch(tmp_path / "from_one", 2, str(llm_dir), "resume", "replicate", str(tmp_path / "one"))
    assert from_two["loaded_step"] == from_one["loaded_step"] == 2
    assert largest_difference(from_two["weights"], two["weights"]) == 0
    assert largest_difference(from_one["weights"], one["weights"]) == 0
    assert abs(from_two["losses"][0] - from_one["losses"][0]) < ATOL  # optimizer state resharded too
    assert largest_difference(from_two["after"], from_one["after"]) < ATOL


@pytest.mark.parametrize("section, message", [
    ({"model_parallel": 2}, r"parallel\.model_parallel=2 is not supported"),
    ({"strategy": "zero3"}, r"parallel\.strategy='zero3' is not supported; valid: ddp, fsdp"),
    ({"llm": "offload"}, r"parallel\.llm='offload' is not supported; valid: replicate, shard"),
    ({"data_parallel": 0}, r"parallel\.data_parallel=0 must be a positive number"),
])
def test_parallel_section_errors_are_one_line(section, message):
    with pytest.raises(ConfigError, match=message) as caught:
        RunConfig.from_dict({"parallel": section})
    assert "\n" not in str(caught.value)


def test_data_parallel_must_match_the_launch():
    assert ParallelConfig().data_parallel_size(4) == 4
    assert ParallelConfig(data_parallel=2).data_parallel_size(2) == 2
    with pytest.raises(ConfigError, match=r"data_parallel=2 but 4 processes were launched .*set data_parallel to 4"):
        ParallelConfig(data_parallel=2).data_parallel_size(4)
    parsed = RunConfig.from_dict({"parallel": {"data_parallel": 2, "model_parallel": 1, "strategy": "fsdp",
                                               "llm": "shard", "activation_checkpointing": True}}).parallel
    assert (parsed.strategy, parsed.llm, parsed.activation_checkpointing) == ("fsdp", "shard", True)


def stage2_trainer_config(tmp_path: Path, name: str, strategy: str) -> Path:
    """Generated shapes, a caption LLM trained for two steps (tied embeddings), a random stage-1 folder."""
    import json

    from blip2.cli.demo import train_caption_llm
    from blip2.config import Blip2Config
    from blip2.models import Blip2Qformer
    from tests.helpers import shapes_data
    from tests.test_generation_tasks import stage1_model_config, stage2_run_config

    data = shapes_data(tmp_path / "shapes", num_train=16, num_test=8)
    if not (tmp_path / "llm").is_dir():
        captions = [r["caption"] for r in json.loads((data.root / data.train_annotation).read_text())]
        train_caption_llm(captions, tmp_path / "llm", steps=2, batch_size=16, hidden_size=32, learning_rate=1e-2)
        torch.manual_seed(0)
        Blip2Qformer(Blip2Config.from_dict(stage1_model_config())).save_pretrained(tmp_path / "stage1")
    config = stage2_run_config(data, tmp_path, tmp_path / name, max_steps=3)
    config["train_dataset"]["batch_size"] = 2
    config["runner_config"].update(save_steps=1, max_grad_norm=1.0)
    config["parallel"] = {"strategy": strategy, "llm": "shard", "activation_checkpointing": True}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def test_trainer_fsdp_stage2_equals_ddp_writes_dcp_and_resumes_on_one_process(tmp_path):
    from safetensors.torch import load_file

    trainer_worker = Path(__file__).with_name("fsdp_trainer_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for strategy in ("ddp", "fsdp"):
        config = stage2_trainer_config(tmp_path, strategy, strategy)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                   str(free_port()), str(trainer_worker), str(config)]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-3000:]
        runs[strategy] = tmp_path / strategy / "out"
    last = runs["fsdp"] / "checkpoints" / "step_00000003"
    assert (last / "dcp" / ".metadata").is_file() and not (last / "model").exists()
    assert (runs["ddp"] / "checkpoints" / "step_00000003" / "model").is_dir()
    by_ddp = load_file(runs["ddp"] / "model" / "model.safetensors")
    by_fsdp = load_file(runs["fsdp"] / "model" / "model.safetensors")  # gathered: a plain folder
    assert by_ddp.keys() == by_fsdp.keys() and any(key.startswith("qformer.") for key in by_ddp)
    for key, value in by_ddp.items():
        torch.testing.assert_close(by_fsdp[key], value, atol=ATOL, rtol=0, msg=key)

    # one plain process (no torchrun) resumes the two-process DCP checkpoint and trains on
    completed = subprocess.run([sys.executable, str(trainer_worker), str(tmp_path / "fsdp.json"), "5"], env=env,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resumed from" in completed.stderr and "step_00000003 at step 3" in completed.stderr
    assert (runs["fsdp"] / "finished.txt").read_text() == "5 1"
