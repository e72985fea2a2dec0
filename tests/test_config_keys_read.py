"""Issue 10, item 19: a config key that nobody reads is never accepted silently; it is honoured or refused in one line.

``type`` keys name what they build and accept only what exists (the seed's names included); ``text_transforms.
max_length`` and ``model_config.prompt`` must agree with what the data set applies; ``parallel.backend`` is gone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from blip2 import Blip2ImageToTextGeneration, pipeline
from blip2.cli import main
from blip2.config import ConfigError
from blip2.engine.run_config import RunConfig
from blip2.engine.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "blip2"
QUICKSTART = CONFIGS / "run_blip2_quickstart.yaml"


def quickstart() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def one_line_error(capsys, tmp_path: Path, config: dict) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--output_dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blip2: error:"), lines
    return lines[0]


@pytest.mark.parametrize("section, key, bad, message", [
    ("optimizer", "type", "sgd", r"optimizer\.type='sgd' is not supported; valid: adamw, AdamW, AdamWeightDecay"),
    ("lr_schedule", "type", "linear",
     r"lr_schedule\.type='linear' is not supported; valid: cosine, CosineWithWarmUpLR"),
])
def test_item19_optimizer_and_schedule_types_are_read(capsys, tmp_path, section, key, bad, message):
    import re

    config = quickstart()
    config[section][key] = bad
    assert re.search(message, one_line_error(capsys, tmp_path, config))


@pytest.mark.parametrize("section, value", [("optimizer", "AdamWeightDecay"), ("optimizer", "AdamW"),
                                            ("lr_schedule", "CosineWithWarmUpLR")])
def test_item19_the_seeds_names_are_accepted(section, value):
    config = quickstart()
    config[section]["type"] = value
    assert getattr(RunConfig.from_dict(config), section).type == value


@pytest.mark.parametrize("where, value, message", [
    (("train_dataset", "data_loader", "type"), "CocoLoader",
     r"data_loader\.type='CocoLoader' is not supported; valid: MultiImgCapDataLoader, ImageFolderDataset"),
    (("eval_dataset", "tokenizer", "type"), "GPT2Tokenizer",
     r"tokenizer\.type='GPT2Tokenizer' is not supported; valid: BertTokenizer, LlamaTokenizer, AutoTokenizer"),
    (("train_dataset", "text_transforms", "type"), "BlipQuestion",
     r"text_transforms\.type='BlipQuestion' is not supported; valid: CaptionTransform"),
    (("train_dataset", "tokenizer", "padding"), "do_not_pad", r"tokenizer\.padding='do_not_pad'"),
    (("model", "arch", "type"), "Blip2Classifierr", r"model\.arch\.type='Blip2Classifierr' is not supported"),
])
def test_item19_unknown_types_are_refused_at_load_naming_the_valid_ones(where, value, message):
    config = quickstart()
    node = config
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(config)


def test_item19_set_overrides_are_checked_too(capsys):
    assert main(["run", "--config", str(QUICKSTART), "--set", "optimizer.type=sgd"]) == 2
    assert "optimizer.type='sgd' is not supported" in capsys.readouterr().err


def test_item19_a_tokenizer_type_must_fit_the_model(tmp_path):
    config = {"output_dir": str(tmp_path / "out"), "trainer": {"type": "image_to_text_retrieval"},
              "eval_dataset": {"tokenizer": {"type": "LlamaTokenizer"}}}
    with pytest.raises(ValueError, match=r"eval_dataset\.tokenizer\.type='LlamaTokenizer' does not fit a stage-1"):
        Trainer(model="blip2_tiny", config=config)


def test_item19_text_transforms_max_length_must_agree_with_the_tokenizer():
    config = quickstart()
    config["train_dataset"]["text_transforms"]["max_length"] = 40
    with pytest.raises(ConfigError, match=r"text_transforms\.max_length=40 but tokenizer\.max_length=32"):
        RunConfig.from_dict(config)
    config["train_dataset"]["tokenizer"]["max_length"] = 40
    assert RunConfig.from_dict(config).train_dataset.tokenizer.max_length == 40


def test_item19_parallel_section_keeps_only_what_is_honoured():
    config = quickstart()
    config["parallel"] = {"backend": "nccl"}
    with pytest.raises(ConfigError, match=r"unknown config key 'parallel\.backend'"):
        RunConfig.from_dict(config)
    config["parallel"] = {"gradients_mean": False}
    with pytest.raises(ConfigError, match=r"parallel\.gradients_mean=False is not supported"):
        RunConfig.from_dict(config)
    config["parallel"] = {"gradients_mean": True}
    assert RunConfig.from_dict(config).parallel.gradients_mean is True


@pytest.mark.parametrize("declared, used, ok", [
    (False, "", True), (True, "a photo of ", True), ("a photo of ", "a photo of ", True), ("", "a photo of ", True),
    (True, "", False), (False, "a photo of ", False), ("a picture of ", "a photo of ", False),
])
def test_item19_model_prompt_must_agree_with_the_training_prompt(declared, used, ok):
    config = quickstart()
    config["model"]["model_config"]["prompt"] = declared
    config["train_dataset"]["text_transforms"]["prompt"] = used
    if ok:
        RunConfig.from_dict(config)
    else:
        with pytest.raises(ConfigError, match=r"model\.model_config\.prompt=.* but train_dataset\.text_transforms"):
            RunConfig.from_dict(config)


def test_item19_a_trainer_config_changed_in_code_is_checked(tmp_path):
    config = RunConfig.from_dict({"output_dir": str(tmp_path / "out")})
    config.optimizer.type = "sgd"
    with pytest.raises(ConfigError, match="optimizer.type='sgd'"):
        Trainer(model="blip2_tiny", config=config)


def test_item19_every_shipped_config_still_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert "run_blip2_tiny_own_data.yaml" in {f.name for f in files}
    for path in files:
        RunConfig.from_yaml(path)


@pytest.fixture(scope="module")
def stage2_folder(tmp_path_factory):
    from blip2.processing.llm_tokenizer import load_llm_tokenizer
    from llm_fixtures import VOCAB, write_byte_level_bpe
    from weights_fixtures import build_hf_generation

    folder = tmp_path_factory.mktemp("hf_blip2_opt")
    build_hf_generation(vocab_size=VOCAB + 1, image_token_index=VOCAB).save_pretrained(folder)
    load_llm_tokenizer(write_byte_level_bpe(tmp_path_factory.mktemp("opt_tokenizer"), "opt")).save_pretrained(
        str(folder))
    return folder


@torch.no_grad()
def test_item19_model_prompt_is_where_generation_starts(stage2_folder):
    """The model's own prompt (the text its captions were trained after) is the prompt of an image given none."""
    model = Blip2ImageToTextGeneration.from_pretrained(stage2_folder)
    model.config.prompt = "a photo of"
    generate = pipeline("image_to_text_generation", model=model, max_new_tokens=2)
    image = np.full((24, 24, 3), 90, dtype=np.uint8)
    assert generate(image)["generated_text"].startswith("a photo of")
    assert generate(image, prompt="the old train")["generated_text"].startswith("the old train")
    model.config.prompt = ""
    assert not generate(image)["generated_text"].startswith("a photo of")
