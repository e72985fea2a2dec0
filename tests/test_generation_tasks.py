"""Stage 2 through the Trainer: the caption collator, stage-2 training from a stage-1 model on generated data,
caption evaluation and prompted prediction, and the caption LM the demo trains."""

from __future__ import annotations

import json

import pytest
import torch

from blip2.config import Blip2Config
from blip2.data import ImageCaptionLMCollator
from blip2.cli.demo import train_caption_llm
from blip2.engine.trainer import Trainer
from blip2.processing.llm_tokenizer import load_llm_tokenizer
from blip2.models import Blip2Qformer
from tests.helpers import run_config, shapes_data


@pytest.fixture(scope="module")
def stage2_setup(tmp_path_factory):
    """Shapes data, a tiny caption LLM trained on its captions, and a tiny stage-1 model saved as a folder."""
    root = tmp_path_factory.mktemp("stage2")
    data = shapes_data(root / "shapes")
    captions = [r["caption"] for r in json.loads((data.root / data.train_annotation).read_text())]
    lm = train_caption_llm(captions, root / "llm", steps=60, batch_size=16, hidden_size=32, learning_rate=1e-2)
    torch.manual_seed(0)
    stage1_config = stage1_model_config()
    Blip2Qformer(Blip2Config.from_dict(stage1_config)).save_pretrained(root / "stage1")
    return data, root, lm


def stage1_model_config() -> dict:
    return {"embed_dim": 16, "max_txt_len": 16,
            "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
                              "num_attention_heads": 2, "intermediate_size": 64},
            "qformer_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64, "query_length": 4, "max_position_embeddings": 32}}


def stage2_run_config(data, root, tmp_path, max_steps: int = 30, prompt: str = "") -> dict:
    config = run_config(data.root, tmp_path / "out", max_steps=max_steps, batch_size=8, learning_rate=3e-3)
    model_config = {**stage1_model_config(), "checkpoint_name_or_path": str(root / "stage1"),
                    "text_config": {"checkpoint_name_or_path": str(root / "llm" / "model"), "seq_length": 48}}
    config["model"] = {"arch": {"type": "Blip2ImageToTextGeneration"}, "model_config": model_config}
    config["trainer"] = {"type": "contrastive_language_image_pretrain"}  # the seed's name for both stages
    config["train_dataset"]["tokenizer"] = {"max_length": 16}
    config["train_dataset"]["text_transforms"] = {"prompt": prompt}
    config["train_dataset"]["augment"] = False
    config["eval_dataset"]["tokenizer"] = {"max_length": 16}
    config["eval_dataset"]["text_transforms"] = {"prompt": prompt}
    return config


def test_caption_lm_learns_the_captions(stage2_setup):
    _, _, lm = stage2_setup
    assert lm["last_loss"] < 0.6 * lm["first_loss"]


def test_collator_masks_prompt_bos_and_padding_and_appends_eos(stage2_setup):
    _, root, _ = stage2_setup
    tokenizer = load_llm_tokenizer(root / "llm" / "model")
    collate = ImageCaptionLMCollator(lambda images, train, seeds: {"pixel_values": torch.zeros(len(images), 3, 4, 4)},
                                     tokenizer, max_length=16, prompt="a photo of", train=False)
    items = [{"image": None, "caption": "a photo of a red circle.", "index": 0},
             {"image": None, "caption": "a photo of a big blue square on the left.", "index": 1}]
    batch = collate(items)
    prompt_ids = tokenizer("a photo of")["input_ids"]
    for row in range(2):
        ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
        expected = tokenizer(items[row]["caption"])["input_ids"] + [tokenizer.eos_token_id]
        length = int(mask.sum())
        assert ids[:length].tolist() == expected  # BOS ... caption EOS, right-padded
        assert ids[0].item() == tokenizer.bos_token_id
        assert (labels[: len(prompt_ids)] == -100).all()  # BOS and the prompt are not targets
        assert labels[len(prompt_ids) : length].tolist() == expected[len(prompt_ids) :]
        assert (labels[length:] == -100).all()


def test_stage2_training_from_stage1_lowers_the_loss_and_evaluates(stage2_setup, tmp_path):
    data, root, _ = stage2_setup
    trainer = Trainer(config=stage2_run_config(data, root, tmp_path, max_steps=40))
    assert trainer.task.name == "image_to_text_generation_pretrain"
    model = trainer.model
    stage1 = Blip2Qformer.from_pretrained(root / "stage1")
    assert torch.equal(model.query_tokens, stage1.query_tokens)  # started from the stage-1 folder
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.98 * log[0]["loss"]  # the undertrained test LM's own loss is the floor
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in llm_before.items())  # frozen

    metrics = trainer.evaluate(num_beams=1)
    assert {"Bleu_4", "CIDEr"} <= metrics.keys()
    assert 0.0 <= metrics["Bleu_4"] <= 1.0
    rows = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert len(rows) == data_size(data)

    # the saved folder refers to the LLM folder and loads back for prediction
    reloaded = Trainer(config={**stage2_run_config(data, root, tmp_path), "load_checkpoint": str(tmp_path / "out" / "model"),
                               "trainer": {"type": "image_to_text_generation"}})
    images = [str(data.root / data.image_dir / r["image"]) for r in json.loads((data.root / data.test_annotation).read_text())[:3]]
    predictions = reloaded.predict(images, prompt="a", max_new_tokens=5)
    assert [p["image"] for p in predictions] == images
    assert all(p["generated_text"].startswith("a") for p in predictions)
    bare = reloaded.predict(images, prompt="a", max_new_tokens=5, return_full_text=False)
    assert all(p["generated_text"].endswith(b["generated_text"]) for p, b in zip(predictions, bare))
    questions = reloaded.predict(images[:2], prompt=["what colour?", "what shape?"], max_new_tokens=3,
                                 hypothesis_template="Question: {} Answer:")
    assert questions[1]["generated_text"].startswith("Question: what shape? Answer:")


def data_size(data) -> int:
    return len(json.loads((data.root / data.test_annotation).read_text()))


def test_cli_predicts_with_a_prompt_from_a_stage2_folder(stage2_setup, tmp_path, capsys):
    from blip2.cli import main
    from blip2.engine.run_config import RunConfig

    data, root, _ = stage2_setup
    trainer = Trainer(config=stage2_run_config(data, root, tmp_path, max_steps=2))
    trainer.train()
    config = RunConfig.from_dict({**stage2_run_config(data, root, tmp_path), "run_mode": "predict",
                                  "trainer": {"type": "image_to_text_generation"}})
    config.eval_dataset.data_loader.hypothesis_template = "Question: {} Answer:"
    config.to_yaml(tmp_path / "predict.yaml")
    image = str(data.root / data.image_dir / "test" / "00000.png")
    assert main(["run", "--config", str(tmp_path / "predict.yaml"), "--predict_data", image, "--prompt", "what?",
                 "--load_checkpoint", str(tmp_path / "out" / "model"), "--output_dir", str(tmp_path / "pred"),
                 "--set", "eval_dataset.batch_size=1"]) == 0
    predictions = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert predictions[0]["image"] == image
    assert predictions[0]["generated_text"].startswith("Question: what? Answer:")
