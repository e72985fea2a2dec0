"""``blip2 demo``: generate the shapes data, train the quickstart model, evaluate retrieval and zero-shot
classification, show predictions for a few held-out images, and write ``report.md`` with a loss-curve PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image, ImageDraw

QUICKSTART = "run_blip2_quickstart.yaml"
CLASSIFICATION = "run_blip2_quickstart_classification.yaml"
STAGE2 = "run_blip2_quickstart_stage2.yaml"


def config_path(name: str) -> Path:
    """The run YAMLs live in the repository's configs/blip2/ folder."""
    path = Path(__file__).resolve().parents[1] / "configs" / "blip2" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the demo from a source checkout of blip2")
    return path


def plot_losses(log: list[dict], path: Path, width: int = 720, height: int = 400) -> None:
    """Loss curves (total and the three parts) as a PNG, drawn with Pillow."""
    keys = [("loss", (20, 20, 20)), ("loss_itc", (200, 50, 50)), ("loss_itm", (50, 140, 60)),
            ("loss_lm", (50, 80, 220))]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40
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


def run_demo(output_dir: str | Path = "blip2_demo", steps: int | None = None, device: str = "auto",
             num_train: int = 2000, num_test: int = 200, images_per_class: int = 10,
             batch_size: int | None = None, stage2_steps: int | None = None, llm_steps: int = 600) -> dict:
    """The whole demo; returns the numbers of the report (retrieval, zero-shot accuracy, caption hits).

    ``stage2_steps=0`` skips stage 2 (the caption LM and the Q-Former -> LLM training); None: the config's steps.
    """
    from blip2.data import ImageFolderDataset, generate_shapes_dataset, shapes_caption_fields
    from blip2.engine.run_config import RunConfig
    from blip2.engine.trainer import Trainer, logger

    started = time.perf_counter()
    out = Path(output_dir)
    data = generate_shapes_dataset(out / "shapes", num_train=num_train, num_test=num_test, image_size=64, seed=0,
                                   captions_per_image=3, images_per_class=images_per_class)
    logger.info("generated data in %s", data.root)

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
    train_seconds = time.perf_counter() - started
    retrieval = trainer.evaluate()

    classify_config = RunConfig.from_yaml(config_path(CLASSIFICATION))
    classify_config.output_dir = str(out / "classification")
    classify_config.device = device
    classify_config.eval_dataset.data_loader.dataset_dir = str(data.root / data.classes_dir)
    classifier = Trainer(config=classify_config, model=trainer.model, tokenizer=trainer.tokenizer,
                         eval_dataset=ImageFolderDataset(data.root / data.classes_dir))
    accuracy = classifier.evaluate()

    test_records = json.loads((data.root / data.test_annotation).read_text())[:8]
    images = [str(data.root / data.image_dir / record["image"]) for record in test_records]
    captions = trainer.predict(input_data=images, top_k=1)
    labels = classifier.predict(input_data=images, candidate_labels=list(data.classes), top_k=1)
    rows, named = [], 0
    for record, caption, label in zip(test_records, captions, labels):
        colour, shape = shapes_caption_fields(caption["caption"])
        named += colour == record["colour"] and shape == record["shape"]
        rows.append(f"| {record['image']} | {record['colour']} {record['shape']} | {caption['caption']} | "
                    f"{label[0]['label']} ({label[0]['score']:.2f}) |")

    log = [json.loads(line) for line in (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()]
    plot_losses(log, out / "loss_curves.png")
    total_seconds = time.perf_counter() - started
    report = "\n".join([
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
    results = {"retrieval": retrieval, "classification": accuracy, "captions_named": named, "captions": len(rows),
               "seconds": total_seconds, "train_seconds": train_seconds}
    if stage2_steps != 0:
        stage2 = run_stage2(out, data, Path(config.output_dir) / "model", device, stage2_steps, llm_steps)
        report += stage2.pop("report")
        results["stage2"] = stage2
    (out / "report.md").write_text(report, encoding="utf-8")
    print(report)
    print(f"report written to {out / 'report.md'}")
    return results


def run_stage2(out: Path, data, stage1_model: Path, device: str, steps: int | None, llm_steps: int) -> dict:
    """Stage 2 on the shapes data: a tiny caption LM trained on the training captions alone, frozen; the stage-1
    Q-Former then trained to prompt it; held-out images captioned and scored (BLEU, CIDEr, colour+shape named)."""
    from blip2.data import shapes_caption_fields
    from blip2.engine.run_config import RunConfig
    from blip2.engine.text_pretrain import train_caption_llm
    from blip2.engine.trainer import Trainer
    from blip2.processing.text import clean_caption

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
    config.model.model_config.text_config["checkpoint_name_or_path"] = str(out / "caption_llm")
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
        if len(table) < 8:
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
