"""Issue 10: the bad-input table. Each row is what a user (or a hostile file) gives ``blip2``; the answer must be exit
status 2 and exactly one ``blip2: error:`` line naming the problem, never a traceback, and nothing run or lost.

Rows go through ``blip2.cli.main`` as a user types them, on the quickstart config pointed at a small generated shapes
data set (1-2 training steps where a row trains).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from PIL import Image

from blip2.cli import main
from tests.helpers import WritesAFile, shapes_data

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "blip2" / "run_blip2_quickstart.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return shapes_data(tmp_path_factory.mktemp("shapes"), num_train=6, num_test=3, image_size=64).root


@dataclass
class Env:
    """What a row may use: a scratch folder, the data, and a writer of run YAMLs derived from the quickstart's."""

    tmp: Path
    data: Path
    monkeypatch: pytest.MonkeyPatch

    def config(self, **changes) -> dict:
        config = yaml.safe_load(QUICKSTART.read_text())
        config["output_dir"] = str(self.tmp / "out")
        config["device"] = "cpu"
        for section in ("train_dataset", "eval_dataset"):
            config[section]["data_loader"]["dataset_dir"] = str(self.data)
        config["eval_dataset"]["batch_size"] = 8
        config["eval_dataset"]["k_test"] = 4
        config["runner_config"].update(max_steps=1, batch_size=4, log_interval=1, save_steps=0)
        config["lr_schedule"]["warmup_steps"] = 1
        for key, value in changes.items():  # "section.sub.key": value
            *path, last = key.split(".")
            node = config
            for part in path:
                node = node.setdefault(part, {})
            node[last] = value
        return config

    def yaml(self, name: str = "run.yaml", **changes) -> str:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(self.config(**changes), sort_keys=False))
        return str(path)

    def copy_data(self) -> Path:
        """A private copy of the data set, for rows that spoil it."""
        copy = self.tmp / "data"
        shutil.copytree(self.data, copy)
        return copy

    def train(self, *extra: str) -> str:
        """Train one step into ``out``; returns the run YAML."""
        config = self.yaml()
        assert main(["run", "--config", config, *extra]) == 0
        return config


def _evil_trainer_state(env: Env) -> list[str]:
    config = env.yaml(**{"runner_config.save_steps": 1})
    assert main(["run", "--config", config]) == 0
    checkpoint = next((env.tmp / "out" / "checkpoints").iterdir())
    torch.save({"step": WritesAFile(env.tmp / "marker")}, checkpoint / "trainer_state.pt")
    return ["run", "--config", config, "--resume", "--set", "runner_config.max_steps=2"]


def _evil_cifar(env: Env) -> list[str]:
    folder = env.tmp / "cifar-100-python"
    folder.mkdir()
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple"], b"coarse_label_names": [b"x"]}))
    (folder / "test").write_bytes(pickle.dumps({b"data": WritesAFile(env.tmp / "marker"), b"fine_labels": [0]}))
    config = env.config(**{"trainer.type": "zero_shot_image_classification", "run_mode": "eval"})
    config["eval_dataset"]["data_loader"] = {"type": "Cifar100DataLoader", "dataset_dir": str(folder.parent),
                                             "stage": "test"}
    config["eval_dataset"]["tokenizer"]["vocab_file"] = str(env.data / "vocab.txt")
    path = env.tmp / "cifar.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["run", "--config", str(path)]


def _all_images_unreadable(env: Env) -> list[str]:
    data = env.copy_data()
    for image in (data / "images").rglob("*.png"):
        image.write_bytes(b"not a png")
    return ["run", "--config", env.yaml(**{"train_dataset.data_loader.on_error": "skip"}),
            "--train_dataset_dir", str(data), "--set", "runner_config.max_steps=5"]


def _truncated_safetensors(env: Env) -> list[str]:
    env.train()
    weights = env.tmp / "out" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["run", "--config", env.yaml(), "--run_mode", "eval", "--load_checkpoint", str(env.tmp / "out" / "model")]


def _lavis_pth(env: Env) -> Path:
    """A LAVIS-style checkpoint whose keys fit no BLIP-2: an ITM head of the wrong width, a stray key."""
    path = env.tmp / "other.pth"
    torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(128), "query_tokens": torch.zeros(1, 8, 128),
                          "itm_head.weight": torch.zeros(2, 7), "visual_encoder.mystery": torch.zeros(3)}}, path)
    return path


def _keys_that_do_not_fit(env: Env) -> list[str]:
    return ["run", "--config", env.yaml(), "--run_mode", "eval", "--load_checkpoint", str(_lavis_pth(env))]


def _non_utf8_annotations(env: Env) -> list[str]:
    data = env.copy_data()
    (data / "annotations" / "train.json").write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')
    return ["run", "--config", env.yaml(), "--train_dataset_dir", str(data)]


def _empty_eval_set(env: Env) -> list[str]:
    data = env.copy_data()
    (data / "annotations" / "test.json").write_text("[]")
    return ["run", "--config", env.yaml(), "--run_mode", "eval", "--eval_dataset_dir", str(data)]


def _corrupt_image(env: Env, content: bytes) -> list[str]:
    image = env.tmp / "bad.png"
    image.write_bytes(content)
    return ["run", "--config", env.yaml(), "--run_mode", "predict", "--predict_data", str(image)]


def _decompression_bomb(env: Env) -> list[str]:
    image = env.tmp / "bomb.png"
    Image.new("L", (400, 300)).save(image)
    env.monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # PIL refuses over twice this: 120,000 pixels
    return ["run", "--config", env.yaml(), "--run_mode", "predict", "--predict_data", str(image)]


def _fresh_run_over_a_run(env: Env) -> list[str]:
    config = env.yaml(**{"runner_config.save_steps": 1})
    assert main(["run", "--config", config]) == 0
    return ["run", "--config", config]


def _output_dir_is_a_file(env: Env) -> list[str]:
    (env.tmp / "taken").write_text("the user's file")
    return ["run", "--config", env.yaml(), "--output_dir", str(env.tmp / "taken")]


def _output_dir_under_a_file(env: Env, mode: str) -> list[str]:
    (env.tmp / "taken").write_text("the user's file")
    return ["run", "--config", env.yaml(), "--run_mode", mode, "--output_dir", str(env.tmp / "taken" / "out")]


def _convert_onto_user_folder(env: Env) -> list[str]:
    target = env.tmp / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("the user's notes")
    return ["convert", "--from", "lavis", "--config", "blip2_tiny", "--input", str(_lavis_pth(env)),
            "--output", str(target)]


def _disk_full(env: Env, where: str) -> list[str]:
    """Saving under ``where`` finds the disk full (the pre-flight check, or the write itself)."""
    import errno
    import shutil as shutil_module

    from blip2.weights import loader

    real_disk_usage, real_save_file = shutil_module.disk_usage, loader.save_file

    def full_disk_usage(path):
        usage = real_disk_usage(path)
        return type(usage)(usage.total, usage.total - 1000, 1000) if where in str(path) else usage

    def full_save_file(tensors, filename, *args, **kwargs):
        if where in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save_file(tensors, filename, *args, **kwargs)

    env.monkeypatch.setattr(shutil_module, "disk_usage", full_disk_usage)
    env.monkeypatch.setattr(loader, "save_file", full_save_file)
    return ["run", "--config", env.yaml(**{"runner_config.save_steps": 1})]


def _yaml_text(env: Env, text: bytes) -> list[str]:
    path = env.tmp / "bad.yaml"
    path.write_bytes(text)
    return ["run", "--config", str(path)]


# (id, argv builder, what the one line must say)
ROWS: list[tuple[str, Callable[[Env], list[str]], str]] = [
    ("missing config", lambda e: ["run", "--config", str(e.tmp / "nope.yaml")], r"nope\.yaml"),
    ("invalid YAML", lambda e: _yaml_text(e, b"seed: [0\nrun_mode: train\n"), r"bad\.yaml.*line"),
    ("non-UTF-8 config", lambda e: _yaml_text(e, b"seed: 0\nrun_mode: \xff\xfe\n"), r"bad\.yaml.*UTF-8"),
    ("config not a mapping", lambda e: _yaml_text(e, b"- 1\n- 2\n"), r"bad\.yaml"),
    ("unknown key", lambda e: ["run", "--config", e.yaml(**{"runner_config.batch_sise": 4})], r"batch_sise"),
    ("unknown --set key", lambda e: ["run", "--config", e.yaml(), "--set", "runner_config.lr=1"], r"lr"),
    ("--set without =", lambda e: ["run", "--config", e.yaml(), "--set", "runner_config.batch_size"], r"KEY\.SUB"),
    ("batch_size 0", lambda e: ["run", "--config", e.yaml(**{"runner_config.batch_size": 0})], r"batch_size"),
    ("log_interval 0", lambda e: ["run", "--config", e.yaml(**{"runner_config.log_interval": 0})], r"log_interval"),
    ("grad accumulation 0", lambda e: ["run", "--config", e.yaml(), "--set",
                                       "runner_config.gradient_accumulation_steps=0"], r"gradient_accumulation"),
    ("negative epochs", lambda e: ["run", "--config", e.yaml(**{"runner_config.epochs": -1})], r"epochs"),
    ("0 steps in all", lambda e: ["run", "--config", e.yaml(**{"runner_config.epochs": 0,
                                                                "runner_config.max_steps": 0})], r"epochs|max_steps"),
    ("list for a number", lambda e: ["run", "--config", e.yaml(**{"runner_config.batch_size": [1, 2]})],
     r"batch_size"),
    ("text for a number", lambda e: ["run", "--config", e.yaml(), "--set", "lr_schedule.learning_rate=fast"],
     r"learning_rate"),
    ("optimizer sgd", lambda e: ["run", "--config", e.yaml(**{"optimizer.type": "sgd"})], r"sgd"),
    ("unknown task", lambda e: ["run", "--config", e.yaml(**{"trainer.type": "segmentation"})], r"segmentation"),
    ("missing train data", lambda e: ["run", "--config", e.yaml(), "--train_dataset_dir", str(e.tmp / "nodata")],
     r"nodata"),
    ("missing vocab", lambda e: ["run", "--config", e.yaml(**{"train_dataset.tokenizer.vocab_file": "v.txt",
                                                                "eval_dataset.tokenizer.vocab_file": "v.txt"})],
     r"v\.txt"),
    ("non-UTF-8 annotations", _non_utf8_annotations, r"train\.json"),
    ("all images unreadable", _all_images_unreadable, r"no usable"),
    ("empty eval set", _empty_eval_set, r"test\.json.*empty"),
    ("output_dir is a file", _output_dir_is_a_file, r"taken.*not a folder"),
    ("train output_dir under a file", lambda e: _output_dir_under_a_file(e, "train"), r"taken"),
    ("eval output_dir under a file", lambda e: _output_dir_under_a_file(e, "eval"), r"taken"),
    ("predict output_dir under a file", lambda e: _output_dir_under_a_file(e, "predict") + [
        "--predict_data", str(e.data / "images")], r"taken"),
    ("fresh run over a run", _fresh_run_over_a_run, r"--overwrite"),
    ("disk full saving a checkpoint", lambda e: _disk_full(e, "step_"), r"step_00000001.*no space left"),
    ("disk full saving the model", lambda e: _disk_full(e, "out/model"), r"out/model.*[Nn]o space left"),
    ("evil trainer_state on --resume", _evil_trainer_state, r"trainer_state\.pt"),
    ("evil CIFAR pickle", _evil_cifar, r"cifar-100-python/test.*(exec|refus)"),
    ("truncated safetensors", _truncated_safetensors, r"model\.safetensors"),
    ("checkpoint keys that do not fit", _keys_that_do_not_fit, r"other\.pth.*(itm_head|mystery)"),
    ("missing --load_checkpoint", lambda e: ["run", "--config", e.yaml(), "--run_mode", "eval",
                                             "--load_checkpoint", str(e.tmp / "gone")], r"gone"),
    ("predict without images or eval set", lambda e: ["run", "--config", e.yaml(**{"eval_dataset": None}),
                                                      "--run_mode", "predict"], r"--predict_data"),
    ("missing --predict_data", lambda e: ["run", "--config", e.yaml(), "--run_mode", "predict",
                                          "--predict_data", str(e.tmp / "no.png")], r"no\.png"),
    ("corrupt image in predict", lambda e: _corrupt_image(e, b"\x89PNG\r\n\x1a\n garbage"), r"bad\.png"),
    ("empty image file in predict", lambda e: _corrupt_image(e, b""), r"bad\.png"),
    ("decompression bomb in predict", _decompression_bomb, r"bomb\.png"),
    ("--prompt for a stage-1 task", lambda e: ["run", "--config", e.yaml(), "--run_mode", "predict", "--predict_data",
                                               str(e.data / "images"), "--prompt", "hi"], r"--prompt"),
    ("convert onto the user's folder", _convert_onto_user_folder, r"mine.*--overwrite"),
    ("convert a missing input", lambda e: ["convert", "--from", "hf", "--input", str(e.tmp / "absent"),
                                           "--output", str(e.tmp / "o")], r"absent"),
]


@pytest.mark.parametrize("build, expected", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line(build, expected, data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("BLIP2_DEBUG", raising=False)
    env = Env(tmp_path, data, monkeypatch)
    argv = build(env)
    capsys.readouterr()  # what a set-up run printed
    user_files = {path: path.read_bytes() for path in tmp_path.rglob("*")
                  if path.is_file() and "out" not in path.relative_to(tmp_path).parts}
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if re.match(r"blip2( convert)?: error: ", line)]
    assert code == 2 and len(errors) == 1, f"rc {code}, stderr:\n{err}"
    assert re.search(expected, errors[0]), errors[0]
    assert not (tmp_path / "marker").exists(), "a crafted pickle ran code"
    for path, content in user_files.items():  # nothing of the user's was moved, deleted or changed
        assert path.is_file() and path.read_bytes() == content, f"{path} was changed"


def test_the_table_covers_the_issues_cases():
    """Issue 10, item 13 and the acceptance: every named bad input has a row."""
    named = {"invalid YAML", "batch_size 0", "log_interval 0", "grad accumulation 0", "list for a number",
             "truncated safetensors", "output_dir is a file", "non-UTF-8 annotations", "empty eval set",
             "evil trainer_state on --resume", "evil CIFAR pickle", "all images unreadable", "0 steps in all",
             "fresh run over a run", "decompression bomb in predict", "optimizer sgd", "convert onto the user's folder"}
    assert named <= {row[0] for row in ROWS}
    assert len(ROWS) == len({row[0] for row in ROWS})


def test_overwrite_flag_starts_a_fresh_run_over_an_old_one_keeping_the_users_files(data, tmp_path, capsys):
    """The way out that the "fresh run over a run" row names: --overwrite replaces the old run's checkpoints and
    model, and nothing else in output_dir."""
    env = Env(tmp_path, data, pytest.MonkeyPatch())
    config = env.yaml(**{"runner_config.save_steps": 1, "runner_config.max_steps": 2})
    assert main(["run", "--config", config]) == 0
    notes = tmp_path / "out" / "notes.txt"
    notes.write_text("the user's notes")
    assert main(["run", "--config", config, "--set", "runner_config.max_steps=1", "--overwrite"]) == 0
    checkpoints = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert checkpoints == ["step_00000001"]  # the old run's step 2 is gone: a later --resume cannot pick it
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1]
    assert notes.read_text() == "the user's notes"
