"""Issue 10: the CLI and the API work as the README and the seed promise them (items 14-18 and 20).

Each test is named after its item and fails on the code before the fix. Models are tiny (32-wide) with the
bert-base-uncased vocabulary shipped with blip2; data is the generated shapes set or a few captions written here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from blip2 import Blip2ImageToTextGeneration, Blip2Qformer, pipeline
from blip2.cli import build_parser, load_run_config, main
from blip2.config import Blip2Config, ConfigError
from blip2.data import MultiImgCapDataLoader, generate_shapes_dataset
from blip2.engine.trainer import Trainer
from blip2.nn.vit import interpolate_pos_embed
from blip2.processing import DEFAULT_VOCAB_FILE, Blip2ImageProcessor, Blip2Processor, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "blip2"
QUICKSTART = CONFIGS / "run_blip2_quickstart.yaml"
OWN_DATA = CONFIGS / "run_blip2_tiny_own_data.yaml"
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not CLIP's: shows whether a saved preprocessor_config.json was read


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


def tiny_stage1(image_size: int = 32) -> Blip2Config:
    """32-wide, the full bert-base-uncased vocabulary (30523 with [DEC]), so the shipped tokenizer fits."""
    return Blip2Config.from_dict({
        "embed_dim": 16, "max_txt_len": 16, "compute_dtype": "float32", "freeze_vision": False,
        "vision_config": {"image_size": image_size, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "intermediate_size": 64},
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64, "query_length": 4, "max_position_embeddings": 40,
                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}})


def marked_vocab(path: Path, marker: str) -> Path:
    """bert-base-uncased's vocabulary with [unused5] renamed ``marker``: which vocab.txt was read shows."""
    lines = DEFAULT_VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    index = lines.index("[unused5]")
    lines[index] = marker
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def save_model_folder(folder: Path, marker: str = "zzfolder", size: int = 32, processor_size: int | None = None):
    """A tiny stage-1 model folder with its processor: preprocessor_config.json (MEAN/STD) and a marked vocab.txt."""
    torch.manual_seed(0)
    Blip2Qformer(tiny_stage1(size)).save_pretrained(folder)
    tokenizer = load_tokenizer(marked_vocab(folder.parent / f"{folder.name}_vocab.txt", marker))
    Blip2Processor(Blip2ImageProcessor(processor_size or size, MEAN, STD), tokenizer, 16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shapes data: 2 colours x 2 shapes, so the class folder data set has 4 classes."""
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=8, num_test=4, image_size=32,
                                   captions_per_image=2, images_per_class=2, colours=("red", "blue"),
                                   shapes=("circle", "square"))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return save_model_folder(tmp_path_factory.mktemp("tiny") / "model")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("blip2: error:")]
    assert len(lines) == 1, err
    return lines[0]


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def stage1_run_yaml(tmp_path: Path, task: str, eval_dataset: dict | None, train_dir: str | None = None,
                    load_checkpoint: str | None = None) -> Path:
    config: dict = {"seed": 0, "output_dir": str(tmp_path / "out"), "device": "cpu", "trainer": {"type": task},
                    "runner_config": {"batch_size": 4, "max_steps": 2, "log_interval": 1}}
    if load_checkpoint:
        config["load_checkpoint"] = load_checkpoint
    if train_dir is not None:
        config["train_dataset"] = {
            "data_loader": {"dataset_dir": train_dir, "annotation_files": ["annotations/train.json"],
                            "image_dirs": ["images"]},
            "tokenizer": {"max_length": 16, "padding": "longest"}, "num_workers": 0, "augment": False}
    if eval_dataset is not None:
        config["eval_dataset"] = eval_dataset
    return write_yaml(tmp_path / "run.yaml", config)


# --- item 14: build only what the mode uses --------------------------------------------------------------------------
def test_item14_predict_builds_no_eval_dataset(capsys, tmp_path, data, model_folder):
    """The README's predict command: the config's data sets point at paths that are not there; predict reads none."""
    missing_eval = {"data_loader": {"dataset_dir": str(tmp_path / "no_such_coco"), "annotation_files": ["test.json"],
                                    "image_dirs": ["images"], "stage": "eval"}}
    config = stage1_run_yaml(tmp_path, "image_to_text_retrieval", missing_eval, train_dir=str(tmp_path / "nowhere"),
                             load_checkpoint=str(model_folder))
    image = str(data.root / data.image_dir / "test" / "00000.png")
    code, out, err = run_cli(capsys, "run", "--config", str(config), "--run_mode", "predict", "--predict_data", image)
    assert code == 0, err
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert predictions[0]["image"] == image and "caption" in predictions[0]
    assert "retrieved" not in predictions[0]  # no eval set at hand: no candidate captions, and no error


def test_item14_train_needs_no_eval_paths_and_evaluates_only_with_an_eval_set(capsys, caplog, tmp_path, data):
    """Training reads the train set only; it evaluates afterwards when the eval set's folder is there."""
    def config(eval_dir: Path, name: str) -> Path:
        raw = yaml.safe_load(QUICKSTART.read_text())
        raw["output_dir"] = str(tmp_path / name)
        raw["train_dataset"]["data_loader"]["dataset_dir"] = str(data.root)
        raw["eval_dataset"]["data_loader"]["dataset_dir"] = str(eval_dir)
        raw["eval_dataset"]["tokenizer"]["vocab_file"] = None  # the data set's own vocab.txt is the train set's
        return write_yaml(tmp_path / f"{name}.yaml", raw)

    small = ["--device", "cpu", "--set", "runner_config.max_steps=2", "--set", "runner_config.batch_size=4",
             "--set", "model.model_config.vision_config.hidden_size=32",
             "--set", "model.model_config.qformer_config.hidden_size=32",
             "--set", "model.model_config.qformer_config.num_attention_heads=4"]
    code, _, err = run_cli(capsys, "run", "--config", str(config(tmp_path / "no_such_dir", "skip")),
                           "--run_mode", "train", *small)
    assert code == 0, err
    assert (tmp_path / "skip" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "skip" / "eval_results.json").exists()
    assert "no evaluation after training" in caplog.text and "--eval_dataset_dir" in caplog.text

    code, _, err = run_cli(capsys, "run", "--config", str(config(data.root, "with_eval")), "--run_mode", "train",
                           *small)
    assert code == 0, err
    assert "r_mean" in json.loads((tmp_path / "with_eval" / "eval_results.json").read_text())


def classification_yaml(tmp_path: Path, model_folder: Path) -> Path:
    """The seed's CIFAR-100 config shape: the eval set's folder is not where the config says."""
    eval_dataset = {"data_loader": {"type": "ImageFolderDataset", "dataset_dir": "cifar-100-python-not-here",
                                    "hypothesis_template": "a {}."},
                    "tokenizer": {"max_length": 16}, "batch_size": 3, "num_workers": 0}
    return stage1_run_yaml(tmp_path, "zero_shot_image_classification", eval_dataset,
                           load_checkpoint=str(model_folder))


def test_item14_classification_predict_takes_class_names_from_eval_dataset_dir(capsys, tmp_path, data, model_folder):
    config = classification_yaml(tmp_path, model_folder)
    image = str(data.root / data.classes_dir / "red_circle" / "000.png")
    code, _, err = run_cli(capsys, "run", "--config", str(config), "--run_mode", "predict", "--predict_data", image,
                           "--eval_dataset_dir", str(data.root / data.classes_dir))
    assert code == 0, err
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert sorted(entry["label"] for entry in predictions[0]) == sorted(data.classes)


def test_item14_predict_over_the_eval_dataset(capsys, tmp_path, data, model_folder):
    """The seed's "predict (data set)": no --predict_data, the eval set's images; one line when there is none."""
    config = classification_yaml(tmp_path, model_folder)
    code, _, err = run_cli(capsys, "run", "--config", str(config), "--run_mode", "predict",
                           "--eval_dataset_dir", str(data.root / data.classes_dir))
    assert code == 0, err
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(predictions) == 4 * 2  # 4 classes x 2 images, each a ranked list of the 4 labels
    assert all(len(ranked) == 4 and abs(sum(e["score"] for e in ranked) - 1) < 1e-4 for ranked in predictions)

    no_eval = stage1_run_yaml(tmp_path, "zero_shot_image_classification", None, load_checkpoint=str(model_folder))
    code, _, err = run_cli(capsys, "run", "--config", str(no_eval), "--run_mode", "predict")
    assert code == 2 and re.search(r"needs --predict_data .* or an eval data set", one_error_line(err))


# --- item 15: a model loaded from a folder keeps where it came from -----------------------------------------------
def test_item15_stage1_pipeline_finds_the_processor_of_a_loaded_model(model_folder):
    model = Blip2Qformer.from_pretrained(model_folder)
    assert model.name_or_path == str(model_folder)
    classify = pipeline("zero_shot_image_classification", model=model, candidate_labels=["cat", "dog"])
    image_processor, tokenizer = classify.processor.image_processor, classify.processor.tokenizer
    assert image_processor.mean == MEAN and image_processor.std == STD
    assert tokenizer.convert_tokens_to_ids("zzfolder") == load_tokenizer().convert_tokens_to_ids("[unused5]")
    assert len(classify(np.zeros((20, 20, 3), dtype=np.uint8))) == 2


@pytest.fixture(scope="module")
def hf_stage2_folder(tmp_path_factory):
    """transformers' Blip2ForConditionalGeneration (tiny OPT) saved with its tokenizer, as the README's blip2-opt."""
    from blip2.processing.llm_tokenizer import load_llm_tokenizer
    from llm_fixtures import VOCAB, write_byte_level_bpe
    from weights_fixtures import build_hf_generation

    folder = tmp_path_factory.mktemp("hf_blip2_opt")
    build_hf_generation(vocab_size=VOCAB + 1, image_token_index=VOCAB).save_pretrained(folder)
    tokenizer = load_llm_tokenizer(write_byte_level_bpe(tmp_path_factory.mktemp("opt_tokenizer"), "opt"))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_item15_readme_stage2_block_finds_the_tokenizer_in_the_model_folder(hf_stage2_folder):
    model = Blip2ImageToTextGeneration.from_pretrained(hf_stage2_folder)
    assert model.name_or_path == str(hf_stage2_folder) and model.llm_folder is None  # the LLM is in the checkpoint
    generate = pipeline("image_to_text_generation", model=model)
    out = generate(np.full((24, 24, 3), 128, dtype=np.uint8), max_new_tokens=3)
    assert isinstance(out["generated_text"], str)
    # the Trainer finds it the same way
    trainer = Trainer(task="image_to_text_generation", model=model, config={"output_dir": "unused"})
    assert type(trainer.tokenizer) is type(generate.processor.tokenizer)
    assert trainer.tokenizer.get_vocab() == generate.processor.tokenizer.get_vocab()


# --- item 16: the seed's Trainer calls ----------------------------------------------------------------------------
def train_set(data) -> object:
    return MultiImgCapDataLoader(data.root, [data.train_annotation], [data.image_dir], stage="train")


def test_item16_trainer_model_as_a_path_string_trains(tmp_path, data, model_folder):
    trainer = Trainer(task="contrastive_language_image_pretrain", model=str(model_folder),
                      train_dataset=train_set(data),
                      config={"output_dir": str(tmp_path / "out"), "device": "cpu",
                              "train_dataset": {"num_workers": 0, "augment": False, "tokenizer": {"max_length": 16}},
                              "runner_config": {"max_steps": 2, "batch_size": 4, "log_interval": 1}})
    assert isinstance(trainer.model, Blip2Qformer) and trainer.model.name_or_path == str(model_folder)
    assert trainer.tokenizer.convert_tokens_to_ids("zzfolder") > 0  # the folder's vocabulary
    trainer.train()
    assert trainer.global_step == 2 and (tmp_path / "out" / "model" / "model.safetensors").is_file()


def test_item16_trainer_model_as_a_preset_name(tmp_path, data, monkeypatch):
    monkeypatch.setenv("BLIP2_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(FileNotFoundError, match=r"preset 'blip2_stage1_vit_g' needs its weight files"):
        Trainer(task="contrastive_language_image_pretrain", model="blip2_stage1_vit_g", train_dataset=train_set(data))
    trainer = Trainer(task="contrastive_language_image_pretrain", model="blip2_tiny", train_dataset=train_set(data),
                      config={"output_dir": str(tmp_path / "out")})
    assert isinstance(trainer.model, Blip2Qformer) and trainer.model.name_or_path == "blip2_tiny"


def test_item16_zero_shot_trainer_takes_candidate_labels(tmp_path, data, model_folder):
    labels = ["sunflower", "tree", "dog", "cat", "toy"]
    trainer = Trainer(task="zero_shot_image_classification", model=str(model_folder), candidate_labels=labels,
                      hypothesis_template="a photo of {}.", config={"output_dir": str(tmp_path / "out")})
    image = Image.open(data.root / data.classes_dir / "red_circle" / "000.png")
    result = trainer.predict(input_data=image)
    assert len(result) == 1 and sorted(entry["label"] for entry in result[0]) == sorted(labels)
    assert trainer.predict(input_data=[image], candidate_labels=["a", "b"])[0][0]["label"] in ("a", "b")
    with pytest.raises(ValueError, match="candidate_labels is for zero_shot_image_classification"):
        Trainer(task="image_to_text_retrieval", model=str(model_folder), candidate_labels=labels)


# --- item 17: --set overrides are validated together ---------------------------------------------------------------
@pytest.mark.parametrize("order", [0, 1])
def test_item17_set_overrides_in_either_order(order):
    # quickstart: Q-Former 128 wide with 8 heads; 36 wide needs 4 heads, and 36 with 8 heads is invalid on the way
    overrides = [["--set", "model.model_config.qformer_config.hidden_size=36"],
                 ["--set", "model.model_config.qformer_config.num_attention_heads=4"]]
    if order:
        overrides.reverse()
    args = build_parser().parse_args(["run", "--config", str(QUICKSTART), *overrides[0], *overrides[1]])
    qformer = load_run_config(args).model.model_config.qformer_config
    assert (qformer.hidden_size, qformer.num_attention_heads) == (36, 4)


def test_item17_an_invalid_result_is_still_one_line(capsys):
    code, _, err = run_cli(capsys, "run", "--config", str(QUICKSTART),
                           "--set", "model.model_config.qformer_config.num_attention_heads=5")
    assert code == 2 and "qformer_config.num_attention_heads=5 must divide" in one_error_line(err)
    args = build_parser().parse_args(["run", "--config", str(QUICKSTART),
                                      "--set", "model.model_config.vision_config.patch_size=7"])
    with pytest.raises(ConfigError, match=r"patch_size=7 must divide"):
        load_run_config(args)


# --- item 18: one checkpoint, one preprocessing; image sizes ------------------------------------------------------
def test_item18_trainer_and_pipeline_preprocess_a_checkpoint_the_same_way(tmp_path, model_folder):
    trainer = Trainer(config={"load_checkpoint": str(model_folder), "trainer": {"type": "image_to_text_retrieval"},
                              "output_dir": str(tmp_path / "out")})
    retrieve = pipeline("image_text_retrieval", model=str(model_folder))
    assert trainer.image_processor.to_dict() == retrieve.processor.image_processor.to_dict()
    assert trainer.image_processor.mean == MEAN
    assert trainer.tokenizer.get_vocab() == retrieve.processor.tokenizer.get_vocab()
    assert trainer.tokenizer.convert_tokens_to_ids("zzfolder") > 0


def test_item18_a_preset_reads_its_files_from_blip2_home_not_the_working_directory(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("BLIP2_HOME", str(home))
    marked_vocab(home / "blip2_tiny" / "vocab.txt", "zzhome")
    Blip2ImageProcessor(32, MEAN, STD).save_pretrained(home / "blip2_tiny")
    marked_vocab(tmp_path / "cwd" / "blip2_tiny" / "vocab.txt", "zzcwd")  # a same-named folder in the working dir
    monkeypatch.chdir(tmp_path / "cwd")
    trainer = Trainer(config={"load_checkpoint": "blip2_tiny", "trainer": {"type": "zero_shot_image_classification"},
                              "output_dir": str(tmp_path / "out")})
    assert trainer.tokenizer.convert_tokens_to_ids("zzhome") > 0
    assert trainer.tokenizer.convert_tokens_to_ids("zzcwd") == trainer.tokenizer.unk_token_id
    assert trainer.image_processor.mean == MEAN and trainer.image_processor.std == STD


@torch.no_grad()
def test_item18_wrong_image_size_is_one_line_unless_interpolated():
    torch.manual_seed(0)
    model = Blip2Qformer(tiny_stage1(32)).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with pytest.raises(ValueError, match=r"^Input image size \(48\*48\) doesn't match model \(32\*32\)") as info:
        model.get_image_features(pixels)
    assert "\n" not in str(info.value) and "interpolate_pos_encoding=True" in str(info.value)
    features = model.get_image_features(pixels, interpolate_pos_encoding=True)
    # the same as a model built for 48 pixels whose position table was resized bicubically from the 4x4 grid
    bigger = Blip2Qformer(tiny_stage1(48)).eval()
    state = dict(model.state_dict())
    state["vision_model.pos_embed"] = interpolate_pos_embed(model.vision_model.pos_embed, (6, 6))
    bigger.load_state_dict(state)
    torch.testing.assert_close(features, bigger.get_image_features(pixels), atol=1e-5, rtol=0)
    ids = torch.tensor([[101, 2000, 102]] * 2)
    assert model.itm_logits(pixels, ids, interpolate_pos_encoding=True).shape == (2, 2)
    assert model.generate(pixels, num_beams=1, max_length=4, interpolate_pos_encoding=True).shape[0] == 2


def test_item18_a_processor_that_does_not_fit_the_model_is_one_line(capsys, tmp_path, data):
    folder = save_model_folder(tmp_path / "model", size=32, processor_size=48)
    config = stage1_run_yaml(tmp_path, "image_to_text_retrieval", None, load_checkpoint=str(folder))
    image = str(data.root / data.image_dir / "test" / "00000.png")
    code, _, err = run_cli(capsys, "run", "--config", str(config), "--run_mode", "predict", "--predict_data", image)
    assert code == 2 and "resizes to 48 pixels but the model reads 32-pixel images" in one_error_line(err)


# --- item 20: a config for the user's own captions -----------------------------------------------------------------
def own_captions(root: Path) -> Path:
    """A few photos-to-be and captions in the LAVIS layout: annotations.json + images/ (one in a subfolder)."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(8):
        name = f"{'beach/' if index % 3 == 0 else ''}photo_{index}.jpg"
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + index, 56, 3), dtype=np.uint8)).save(root / "images" / name)
        captions = ["A dog running on the beach!", "Two people riding bicycles downtown.", "A bowl of ramen."]
        records.append({"image": name, "caption": captions[index % 3]})
    (root / "annotations.json").write_text(json.dumps(records))
    return root


def test_item20_own_data_config_trains_on_a_users_captions(capsys, tmp_path):
    data_dir = own_captions(tmp_path / "my_captions")
    out = tmp_path / "out"
    small = ["--device", "cpu", "--output_dir", str(out), "--set", "runner_config.max_steps=3",
             "--set", "runner_config.batch_size=4", "--set", "train_dataset.num_workers=0"]
    code, _, err = run_cli(capsys, "run", "--config", str(OWN_DATA), "--train_dataset_dir", str(data_dir), *small)
    assert code == 0, err
    assert (out / "model" / "model.safetensors").is_file()
    vocab = (out / "model" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 30522  # the full bert-base-uncased vocabulary ([DEC] is added on load)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3
    reloaded = Blip2Qformer.from_pretrained(out / "model")
    assert pipeline("image_text_retrieval", model=reloaded)(images=[str(data_dir / "images" / "photo_1.jpg")],
                                                            texts=["a dog", "ramen"])["image_to_text"]

    # the quickstart config, by contrast, reads the generated data's vocab.txt: the error says what to use instead
    code, _, err = run_cli(capsys, "run", "--config", str(QUICKSTART), "--train_dataset_dir", str(data_dir),
                           "--output_dir", str(tmp_path / "quick"), "--device", "cpu")
    assert code == 2 and "run_blip2_tiny_own_data.yaml" in one_error_line(err)
