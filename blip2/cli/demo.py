"""``blip2 demo``: generate the shapes data, train the quickstart model, evaluate retrieval and zero-shot
classification, show predictions for a few held-out images, and write ``report.md`` with a loss-curve PNG; then
stage 2 (a tiny caption LM trained by the same Trainer, frozen, prompted by the stage-1 Q-Former) unless
``--stage2_steps 0``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from blip2 import resources
from blip2.data import ImageFolderDataset, generate_shapes_dataset, shapes_caption_fields
from blip2.engine.run_config import RunConfig
from blip2.engine.tasks.stage2 import CaptionTexts, CausalLMPretrainTask, train_sentencepiece
from blip2.engine.trainer import Trainer
from blip2.processing.text import clean_caption

logger = logging.getLogger("blip2")

QUICKSTART = "run_blip2_quickstart.yaml"
CLASSIFICATION = "run_blip2_quickstart_classification.yaml"
STAGE2 = "run_blip2_quickstart_stage2.yaml"
IMAGE_SIZE = 64  # the generated shapes images' side
CAPTIONS_PER_IMAGE = 3
PREDICTION_IMAGES = 8  # held-out images shown with their predictions in the report
LOSS_AVERAGE_STEPS = 20  # the caption LM's final loss: the mean of this many last steps


def config_path(name: str) -> Path:
    """The run YAMLs ship in the package (``blip2/configs/blip2/``)."""
    return resources.config_file(name)


def plot_losses(log: list[dict], path: Path, width: int = 720, height: int = 400) -> None:
    """Loss curves (total and the three parts) as a PNG, drawn with Pillow."""
    keys = [("loss", (20, 20, 20)), ("loss_itc", (200, 50, 50)), ("loss_itm", (50, 140, 60)),
            ("loss_lm", (50, 80, 220))]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40  # the plot's margins, in pixels
    steps = [row["step"] for row in log]
    top_value = max(row[key] for row in log for key, _ in keys if key in row)
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for tick in range(5):
        value = top_value * tick / 4
        y = bottom - (bottom - top) * tick / 4
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((5, y - 6), f"{value:.1f}", fill=(0, 0, 0))
    draw.text((left, bottom + 8), f"step {steps[0]}", fill=(0, 0, 0))
    draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill=(0, 0, 0))
    span = max(1, steps[-1] - steps[0])
    for index, (key, colour) in enumerate(keys):
        points = [(left + (right - left) * (row["step"] - steps[0]) / span,
                   bottom - (bottom - top) * row[key] / top_value) for row in log if key in row]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((right - 90, top + 8 + 14 * index), key, fill=colour)
    image.save(path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``blip2 demo``'s options."""
    parser.add_argument("--output_dir", default="blip2_demo")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the quickstart config's)")
    parser.add_argument("--stage2_steps", type=int, default=None,
                        help="stage-2 training steps (default: the stage-2 quickstart config's; 0 skips stage 2)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")


def run_demo(output_dir: str | Path = "blip2_demo", steps: int | None = None, device: str = "auto",
             num_train: int = 2000, num_test: int = 200, images_per_class: int = 10,
             batch_size: int | None = None, stage2_steps: int | None = None, llm_steps: int = 600) -> dict:
    """The whole demo; returns the numbers of the report (retrieval, zero-shot accuracy, caption hits).

    ``stage2_steps=0`` skips stage 2 (the caption LM and the Q-Former -> LLM training); None: the config's steps.
    """
    started = time.perf_counter()
    out = Path(output_dir)
    data = generate_shapes_dataset(out / "shapes", num_train=num_train, num_test=num_test, image_size=IMAGE_SIZE,
                                   seed=0, captions_per_image=CAPTIONS_PER_IMAGE, images_per_class=images_per_class)
    logger.info("generated data in %s", data.root)
    trainer = train_quickstart(out, data, device, steps, batch_size)
    train_seconds = time.perf_counter() - started
    retrieval = trainer.evaluate()
    classifier = zero_shot_classifier(out, data, device, trainer)
    accuracy = classifier.evaluate()
    rows, named = prediction_rows(data, trainer, classifier)
    log = read_log(trainer.output_dir)
    plot_losses(log, out / "loss_curves.png")
    total_seconds = time.perf_counter() - started
    report = stage1_report(trainer, data, log, retrieval, accuracy, rows, named, train_seconds, total_seconds)
    results = {"retrieval": retrieval, "classification": accuracy, "captions_named": named, "captions": len(rows),
               "seconds": total_seconds, "train_seconds": train_seconds}
    if stage2_steps != 0:
        stage2 = run_stage2(out, data, trainer.output_dir / "model", device, stage2_steps, llm_steps)
        report += stage2.pop("report")
        results["stage2"] = stage2
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"report written to {out / 'report.md'}")
    return results


def read_log(output_dir: Path) -> list[dict]:
    """The records of a run's ``train_log.jsonl``."""
    return [json.loads(line) for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


def train_quickstart(out: Path, data, device: str, steps: int | None, batch_size: int | None) -> Trainer:
    """The quickstart run (stage 1) on the generated data, trained."""
    config = RunConfig.from_yaml(config_path(QUICKSTART))
    config.output_dir = str(out / "quickstart")
    config.overwrite = True  # a second demo replaces the first one's run (only files a run writes)
    config.device = device
    config.train_dataset.data_loader.dataset_dir = str(data.root)
    config.eval_dataset.data_loader.dataset_dir = str(data.root)
    if steps:
        config.runner_config.max_steps = steps
    if batch_size:
        config.runner_config.batch_size = batch_size
    trainer = Trainer(config=config)
    trainer.train()
    return trainer


def zero_shot_classifier(out: Path, data, device: str, trainer: Trainer) -> Trainer:
    """Zero-shot classification of the held-out class folders with the trained model."""
    config = RunConfig.from_yaml(config_path(CLASSIFICATION))
    config.output_dir = str(out / "classification")
    config.device = device
    config.eval_dataset.data_loader.dataset_dir = str(data.root / data.classes_dir)
    return Trainer(config=config, model=trainer.model, tokenizer=trainer.tokenizer,
                   eval_dataset=ImageFolderDataset(data.root / data.classes_dir))


def prediction_rows(data, trainer: Trainer, classifier: Trainer) -> tuple[list[str], int]:
    """Report rows for a few held-out images (caption, zero-shot label), and how many captions name the right colour
    and shape."""
    test_records = json.loads((data.root / data.test_annotation).read_text())[:PREDICTION_IMAGES]
    images = [str(data.root / data.image_dir / record["image"]) for record in test_records]
    captions = trainer.predict(input_data=images, top_k=1)
    labels = classifier.predict(input_data=images, candidate_labels=list(data.classes), top_k=1)
    rows, named = [], 0
    for record, caption, label in zip(test_records, captions, labels):
        colour, shape = shapes_caption_fields(caption["caption"])
        named += colour == record["colour"] and shape == record["shape"]
        rows.append(f"| {record['image']} | {record['colour']} {record['shape']} | {caption['caption']} | "
                    f"{label[0]['label']} ({label[0]['score']:.2f}) |")
    return rows, named


def stage1_report(trainer: Trainer, data, log: list[dict], retrieval: dict, accuracy: dict, rows: list[str],
                  named: int, train_seconds: float, total_seconds: float) -> str:
    return "\n".join([
        "# blip2 demo report", "",
        f"Tiny stage-1 model ({trainer.model_config.qformer_config.num_hidden_layers}-layer Q-Former, "
        f"{sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M parameters) trained for "
        f"{log[-1]['step']} steps on {len(trainer.train_dataset)} generated image-caption pairs, device "
        f"{trainer.device}; training took {train_seconds:.0f} s, the whole demo {total_seconds:.0f} s.", "",
        f"Loss: {log[0]['loss']:.3f} at step {log[0]['step']} -> {log[-1]['loss']:.3f} at step {log[-1]['step']} "
        "(![loss curves](loss_curves.png)).", "",
        "## Image-text retrieval (held-out images, ITC top-k + ITM re-rank)", "",
        "| metric | value |", "|---|---|", *[f"| {k} | {v:.2f} |" for k, v in retrieval.items()], "",
        f"## Zero-shot classification ({len(data.classes)} classes, held-out class folders)", "",
        f"top-1 {accuracy['top1']:.1f}%, top-5 {accuracy['top5']:.1f}% (chance {100 / len(data.classes):.1f}%)", "",
        "## Predictions on held-out images", "",
        f"Q-Former captions name the right colour and shape for {named} of {len(rows)} images.", "",
        "| image | truth | Q-Former caption | zero-shot label |", "|---|---|---|---|", *rows, "",
    ])


# ------------------------------------------------------------------------------------------------------- stage 2


def caption_lm_config(out: Path, steps: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The run config of the caption LM: AdamW (weight decay 0.01), 10% warm-up from lr/25, cosine down to lr/25e4
    (the one-cycle shape), one log record per step, on the CPU."""
    warmup_start = learning_rate / 25
    return {"seed": seed, "output_dir": str(out), "overwrite": True, "device": "cpu",
            "trainer": {"type": CausalLMPretrainTask.name},
            "train_dataset": {"batch_size": batch_size, "num_workers": 0, "drop_remainder": True},
            "runner_config": {"max_steps": steps, "batch_size": batch_size, "log_interval": 1, "save_total_limit": 1},
            "optimizer": {"weight_decay": 0.01, "betas": [0.9, 0.999]},
            "lr_schedule": {"learning_rate": learning_rate, "warmup_steps": max(1, steps // 10),
                            "warmup_lr_init": warmup_start, "lr_end": warmup_start / 1e4}}


def train_caption_llm(texts, out_dir, steps: int = 300, batch_size: int = 64, hidden_size: int = 128,
                      num_layers: int = 2, vocab_size: int = 256, learning_rate: float = 3e-3, seed: int = 0,
                      context_fraction: float = 0.5, max_context: int = 12) -> dict:
    """A small causal LM taught the language of a caption set: a sentencepiece BPE tokenizer trained on ``texts``
    (Llama's layout) and a tiny ``LlamaForCausalLM`` trained by the Trainer (task ``causal_lm_pretrain``) in
    ``out_dir``. Returns the first and last loss and ``folder``, the LLM folder (``out_dir/model``: config.json,
    weights, tokenizer.model) that stage 2 reads as its frozen LLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blip2.processing.llm_tokenizer import load_llm_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(texts, out / "tokenizer.model", vocab_size=vocab_size)
    tokenizer = load_llm_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=True)
    trainer = Trainer(task=CausalLMPretrainTask(context_fraction, max_context), model=LlamaForCausalLM(config),
                      tokenizer=tokenizer, train_dataset=CaptionTexts(texts),
                      config=caption_lm_config(out, steps, batch_size, learning_rate, seed))
    with quiet_log():
        trainer.train()
    losses = [row["loss"] for row in read_log(out)]
    last = sum(losses[-LOSS_AVERAGE_STEPS:]) / len(losses[-LOSS_AVERAGE_STEPS:])
    logger.info("caption LM: loss %.3f -> %.3f in %d steps; saved to %s", losses[0], last, steps, out / "model")
    return {"first_loss": losses[0], "last_loss": last, "folder": out / "model"}


@contextlib.contextmanager
def quiet_log():
    """The library's INFO lines held back (a log line per step would drown the demo's output)."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_stage2(out: Path, data, stage1_model: Path, device: str, steps: int | None, llm_steps: int) -> dict:
    """Stage 2 on the shapes data: a tiny caption LM trained on the training captions alone, frozen; the stage-1
    Q-Former then trained to prompt it; held-out images captioned and scored (BLEU, CIDEr, colour+shape named)."""
    started = time.perf_counter()
    # the LM learns the captions as stage 2 feeds them (lowercase, no punctuation), so it ends them where they end
    captions = [clean_caption(r["caption"]) for r in json.loads((data.root / data.train_annotation).read_text())]
    language = train_caption_llm(captions, out / "caption_llm", steps=llm_steps)
    llm_seconds = time.perf_counter() - started

    config = RunConfig.from_yaml(config_path(STAGE2))
    config.output_dir = str(out / "stage2")
    config.overwrite = True
    config.device = device
    config.model.model_config.checkpoint_name_or_path = str(stage1_model)
    config.model.model_config.text_config["checkpoint_name_or_path"] = str(language["folder"])
    config.train_dataset.data_loader.dataset_dir = str(data.root)
    config.eval_dataset.data_loader.dataset_dir = str(data.root)
    if steps:
        config.runner_config.max_steps = steps
    trainer = Trainer(config=config)
    trainer.train()
    metrics = trainer.evaluate()
    rows = json.loads((Path(config.output_dir) / "captions.json").read_text())
    truth = {record["image"]: record for record in json.loads((data.root / data.test_annotation).read_text())}
    named = 0
    table = []
    for row in rows:
        record = truth[str(Path(row["image"]).relative_to(data.root / data.image_dir))]
        colour, shape = shapes_caption_fields(row["caption"])
        hit = colour == record["colour"] and shape == record["shape"]
        named += hit
        if len(table) < PREDICTION_IMAGES:
            table.append(f"| {record['image']} | {record['colour']} {record['shape']} | {row['caption']} | "
                         f"{'yes' if hit else 'no'} |")
    seconds = time.perf_counter() - started
    log = [json.loads(line) for line in (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()]
    report = "\n".join([
        "## Stage 2: the Q-Former prompts a frozen caption LM", "",
        f"A {sum(p.numel() for p in trainer.model.language_model.parameters()) / 1e6:.2f}M-parameter Llama trained "
        f"on the training captions alone (loss {language['first_loss']:.2f} -> {language['last_loss']:.2f}, "
        f"{llm_seconds:.0f} s), then frozen; stage 2 trained {log[-1]['step']} steps from the stage-1 model "
        f"(loss {log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}); {seconds:.0f} s in all.", "",
        f"Held-out captions (beam search) name the right colour and shape for {named} of {len(rows)} images "
        f"({100 * named / max(1, len(rows)):.1f}%).", "",
        "| metric | value |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in metrics.items()], "",
        "| image | truth | generated caption | colour and shape right |", "|---|---|---|---|", *table, "",
    ])
    return {"captions": metrics, "named": named, "images": len(rows), "named_percent": 100 * named / max(1, len(rows)),
            "seconds": seconds, "report": report}
