"""The command line end to end on generated data, and one clear line for each bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blip2.cli import main
from tests.helpers import shapes_data

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "blip2" / "run_blip2_quickstart.yaml"
SMALL = ["--set", "runner_config.max_steps=4", "--set", "runner_config.batch_size=8",
         "--set", "runner_config.save_steps=2", "--set", "train_dataset.num_workers=0",
         "--set", "model.model_config.qformer_config.hidden_size=32",
         "--set", "model.model_config.vision_config.hidden_size=32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shapes_data(tmp_path_factory.mktemp("shapes"), num_train=12, num_test=6)


def blip2(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blip2", *args], capture_output=True, text=True, timeout=300)


def test_train_then_eval_then_predict(data, tmp_path):
    out = tmp_path / "run"
    common = ["--config", str(QUICKSTART), "--train_dataset_dir", str(data.root), "--eval_dataset_dir",
              str(data.root), "--output_dir", str(out), "--device", "cpu"]
    trained = blip2("run", *common, "--run_mode", "train", *SMALL)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.yaml").is_file()
    assert (out / "checkpoints" / "step_00000004" / "trainer_state.pt").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and {"loss", "loss_itc", "loss_itm", "loss_lm", "lr", "img_per_s"} <= set(log[-1])
    (out / "eval_results.json").unlink()  # train also evaluates when an eval set is configured

    evaluated = blip2("run", *common, "--run_mode", "eval", "--load_checkpoint", str(out / "model"))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.loads((out / "eval_results.json").read_text())
    assert {"txt_r1", "img_r1", "r_mean", "agg_metrics"} <= set(results)

    images = data.root / "images" / "test"
    predicted = blip2("run", *common, "--run_mode", "predict", "--load_checkpoint", str(out / "model"),
                      "--predict_data", str(images / "00000.png"), str(images / "00001.png"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 2 and all("caption" in p and len(p["retrieved"]) == 3 for p in predictions)


def run_main(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def write_config(tmp_path: Path, data_root: Path, change) -> Path:
    config = yaml.safe_load(QUICKSTART.read_text())
    config["train_dataset"]["data_loader"]["dataset_dir"] = str(data_root)
    config["eval_dataset"]["data_loader"]["dataset_dir"] = str(data_root)
    change(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train_dataset"]["data_loader"].update(annotation_files=["annotations/nope.json"]),
     r"annotation file .*nope\.json"),
    (lambda c: c["train_dataset"]["data_loader"].update(image_dirs=["no_such_images"]), r"image folder .*no_such_images"),
    (lambda c: c["trainer"].update(type="captioning"), r"unknown task 'captioning'"),
    (lambda c: c["runner_config"].update(batch_sise=4), r"unknown config key 'runner_config\.batch_sise'"),
    (lambda c: c.update(run_mode="finetune"), r"run_mode='finetune'"),
])
def test_bad_config_is_one_clear_line(capsys, tmp_path, data, change, message):
    import re

    config = write_config(tmp_path, data.root, change)
    code, err = run_main(capsys, "run", "--config", str(config), "--output_dir", str(tmp_path / "out"))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blip2: error:") and re.search(message, lines[0]), err


def test_set_on_a_missing_key_and_unknown_run_mode(capsys, data, tmp_path):
    code, err = run_main(capsys, "run", "--config", str(QUICKSTART), "--set", "runner_config.bach_size=3")
    assert code == 2 and "runner_config.bach_size" in err and "valid keys here" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--config", str(QUICKSTART), "--run_mode", "finetune"])
    assert exit_info.value.code == 2 and "invalid choice: 'finetune'" in capsys.readouterr().err


def test_missing_config_file(capsys, tmp_path):
    code, err = run_main(capsys, "run", "--config", str(tmp_path / "none.yaml"))
    assert code == 2 and "config file not found" in err
