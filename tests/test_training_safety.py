"""Issue 10, training: checkpoints never run code, nothing is lost or mixed, nothing hangs, interrupts resume exactly.

Test names carry the issue's item numbers.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2 import Blip2Qformer
from blip2.config import ConfigError
from blip2.engine import checkpoint as ckpt
from blip2.engine.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from blip2.engine.run_config import RunConfig
from blip2.engine.tasks import PretrainTask
from blip2.engine.trainer import NonFiniteLossError, Trainer
from tests.helpers import WritesAFile, run_config, shapes_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.mktemp("shapes"), num_train=20, num_test=4)  # 40 pairs: 5 batches of 8


def make_trainer(data_root, output_dir, max_steps, save_steps=0, overwrite=False, **runner) -> Trainer:
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny")
    config = run_config(data_root, output_dir, max_steps=max_steps, batch_size=8, save_steps=save_steps, **runner)
    config["lr_schedule"]["total_steps"] = 12
    config["overwrite"] = overwrite
    return Trainer(task="contrastive_language_image_pretrain", model=model, config=config)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), f"{name} differs"


@pytest.mark.parametrize("target", ["trainer_state.pt", "rng_rank0.pt"])
def test_item01_resume_refuses_a_checkpoint_that_would_run_code(data, tmp_path, target):
    make_trainer(data.root, tmp_path / "run", max_steps=2).train()
    folder = latest_checkpoint(tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "payload": WritesAFile(marker)}, folder / target)
    with pytest.raises(CheckpointError) as caught:
        make_trainer(data.root, tmp_path / "run", max_steps=4).train(resume=True)
    assert not marker.exists()
    message = str(caught.value)
    assert "\n" not in message and target in message and "refusing" in message
    with open(folder / target, "wb") as handle:  # a plain pickle, not torch's zip format
        pickle.dump({"step": 1, "payload": WritesAFile(marker)}, handle)
    with pytest.raises(CheckpointError, match="refusing"):
        make_trainer(data.root, tmp_path / "run", max_steps=4).train(resume=True)
    assert not marker.exists()


def test_item04_a_fresh_run_refuses_an_output_dir_holding_another_run(data, tmp_path):
    make_trainer(data.root, tmp_path / "run", max_steps=6, save_steps=3).train()
    with pytest.raises(ValueError, match=r"run.*already holds a run.*step_00000006.*--resume.*--overwrite"):
        make_trainer(data.root, tmp_path / "run", max_steps=4, save_steps=2).train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003", "step_00000006"]
    (tmp_path / "run" / "notes.txt").write_text("mine")
    make_trainer(data.root, tmp_path / "run", max_steps=4, save_steps=2, overwrite=True).train()
    # the new run's own checkpoints survive pruning, the old run's are gone, a resume continues the new run
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002", "step_00000004"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    resumed = make_trainer(data.root, tmp_path / "run", max_steps=5, save_steps=2)
    resumed.train(resume=True)
    assert resumed.global_step == 5


def test_item05_evaluation_checks_the_output_dir_first_and_shows_metrics_before_writing(
        data, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    trainer = make_trainer(data.root, blocker, max_steps=1)
    calls = []
    monkeypatch.setattr(PretrainTask, "evaluate", lambda self, trainer: calls.append(1) or {"r_mean": 1.0})
    with pytest.raises(OSError, match="a_file is a file, not a folder"):
        trainer.evaluate()
    assert calls == [] and blocker.read_text() == "not a folder"
    # a folder that turns unwritable during the work: the metrics were already shown
    monkeypatch.setattr("blip2.engine.trainer.check_writable", lambda directory: directory)
    with caplog.at_level(logging.INFO, logger="blip2"), pytest.raises(OSError):
        trainer.evaluate()
    assert "r_mean=1.00" in caplog.text


def nan_gradients_from(step: int):
    """A training step whose loss stays finite but whose gradients are NaN from optimizer step ``step`` on."""
    original = PretrainTask.training_step
    calls = []

    def training_step(self, model, batch, gather):
        losses = original(self, model, batch, gather)
        calls.append(1)
        if len(calls) >= step:
            query = model.query_tokens
            losses["loss"] = losses["loss"] + torch.sqrt(((query - query.detach()) ** 2).sum())  # 0, d/dx = NaN
        return losses

    return training_step


def test_item06_non_finite_weights_are_never_saved_and_resume_skips_such_checkpoints(
        data, tmp_path, monkeypatch, caplog):
    with monkeypatch.context() as patch:
        patch.setattr(PretrainTask, "training_step", nan_gradients_from(step=4))
        with pytest.raises(NonFiniteLossError, match=r"non-finite.*after step 4.*step_00000002"):
            make_trainer(data.root, tmp_path / "run", max_steps=8, save_steps=2).train()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))
    # a NaN checkpoint written by someone else (or an older version) is skipped on resume, with a warning
    bad = tmp_path / "run" / "checkpoints" / "step_00000003"
    shutil.copytree(tmp_path / "run" / "checkpoints" / "step_00000002", bad)
    weights = load_file(bad / "model" / "model.safetensors")
    weights["query_tokens"] = torch.full_like(weights["query_tokens"], float("nan"))
    save_file(weights, bad / "model" / "model.safetensors")
    trainer = make_trainer(data.root, tmp_path / "run", max_steps=4, save_steps=2)
    with caplog.at_level(logging.WARNING, logger="blip2"):
        trainer.train(resume=True)
    assert "skipping checkpoint" in caplog.text and "step_00000003" in caplog.text
    assert trainer.global_step == 4 and torch.isfinite(trainer.model.query_tokens).all()


def test_item07_disk_full_is_one_line_and_leaves_no_staging_folder(data, tmp_path, monkeypatch):
    trainer = make_trainer(data.root, tmp_path / "run", max_steps=4, save_steps=2)
    real_disk_usage = shutil.disk_usage
    usage = namedtuple("usage", "total used free")

    def nearly_full(path):
        if any(p.name == "step_00000004" or p.name == ".tmp_step_00000004" for p in [Path(path), *Path(path).parents]):
            return usage(10**9, 10**9 - 1000, 1000)
        return real_disk_usage(path)

    monkeypatch.setattr(shutil, "disk_usage", nearly_full)
    with pytest.raises(CheckpointError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "\n" not in message and "no space left" in message and "step_00000004" in message
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002"]
    assert ckpt.weights_are_finite(tmp_path / "run" / "checkpoints" / "step_00000002")


def _mount_small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_item07_a_really_full_disk_during_the_write(data, tmp_path, monkeypatch):
    """On a 40 MB file system (when this machine lets a test mount one): a checkpoint of blip2_tiny takes ~27 MB."""
    disk = tmp_path / "disk"
    if not _mount_small_tmpfs(disk, "40m"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated test above covers the logic")
    try:
        monkeypatch.setattr(ckpt, "_checkpoint_bytes", lambda model, state: 0)  # skip the up-front check: fail mid-write
        trainer = make_trainer(data.root, disk / "run", max_steps=4, save_steps=2)
        with pytest.raises(CheckpointError, match="no space left") as caught:
            trainer.train()
        assert "\n" not in str(caught.value)
        assert [p.name for p in (disk / "run" / "checkpoints").iterdir()] == ["step_00000002"]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: the failed writer may hold a file


def unreadable_images(data_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(data_root, copy)
    for image in (copy / "images" / "train").iterdir():
        image.write_bytes(b"not an image")
    return copy


@pytest.mark.parametrize("limits", [{"max_steps": 5}, {"max_steps": -1, "epochs": 1}])
def test_item08_an_epoch_without_a_usable_batch_stops_with_one_line(data, tmp_path, limits):
    broken = unreadable_images(data.root, tmp_path)
    max_steps = limits.pop("max_steps")
    trainer = make_trainer(broken, tmp_path / "run", max_steps=max_steps, **limits)
    with pytest.raises(ValueError, match="epoch 0 yielded no usable training batch: all 40 items were skipped"):
        trainer.train()
    assert not (tmp_path / "run" / "model").exists()


def test_item09_zero_steps_in_all_is_refused_and_max_steps_zero_means_epochs_decide(data, tmp_path):
    with pytest.raises(ValueError, match="epochs=0 and max_steps<=0 train nothing"):
        make_trainer(data.root, tmp_path / "none", max_steps=0, epochs=0).train()
    trainer = make_trainer(data.root, tmp_path / "one_epoch", max_steps=0, epochs=1)
    trainer.train()
    assert trainer.global_step == 5  # 40 pairs, batches of 8


def interrupt_at(call: int):
    """A real SIGINT (Ctrl-C) delivered inside the ``call``-th forward pass."""
    original = PretrainTask.training_step
    calls = []

    def training_step(self, model, batch, gather):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, model, batch, gather)

    return training_step


@pytest.mark.parametrize("accumulation, interrupt_call", [(1, 5), (2, 7)])
def test_item10_resume_after_ctrl_c_equals_the_uninterrupted_run(data, tmp_path, monkeypatch, accumulation,
                                                                 interrupt_call):
    straight = make_trainer(data.root, tmp_path / "straight", max_steps=8, gradient_accumulation_steps=accumulation)
    straight.train()
    # Python's own Ctrl-C handler, even when pytest was started with SIGINT ignored (e.g. from a background shell job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(PretrainTask, "training_step", interrupt_at(interrupt_call))
            with pytest.raises(KeyboardInterrupt):
                make_trainer(data.root, tmp_path / "split", max_steps=8,
                             gradient_accumulation_steps=accumulation).train()
    finally:
        signal.signal(signal.SIGINT, previous)
    saved = latest_checkpoint(tmp_path / "split")
    assert int(saved.name.split("_")[1]) == (interrupt_call - 1) // accumulation  # the last completed step
    resumed = make_trainer(data.root, tmp_path / "split", max_steps=8, gradient_accumulation_steps=accumulation)
    resumed.train(resume=True)
    assert resumed.global_step == 8
    assert_same_weights(straight.model, resumed.model)


def test_item11_resuming_a_finished_run_does_nothing(data, tmp_path):
    make_trainer(data.root, tmp_path / "run", max_steps=4).train()
    weights = tmp_path / "run" / "model" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    again = make_trainer(data.root, tmp_path / "run", max_steps=4)
    assert again.train(resume=True) == {}
    assert again.global_step == 4
    assert (weights.stat().st_mtime_ns, weights.read_bytes()) == before
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]


@pytest.mark.parametrize("section, key, value", [
    ("runner_config", "batch_size", 0), ("runner_config", "log_interval", 0),
    ("runner_config", "gradient_accumulation_steps", 0), ("runner_config", "epochs", -1),
    ("train_dataset", "batch_size", 0), ("eval_dataset", "num_workers", -2),
])
def test_item13_nonsense_numbers_are_config_errors_naming_the_key(section, key, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.{key}={value} must be a number >= -?\d$"):
        RunConfig.from_dict({section: {key: value}})
