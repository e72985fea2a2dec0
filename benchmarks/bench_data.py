"""Training data throughput per core: tar shards (read + PIL decode + train transform) against the LAVIS JSON +
image folder path (``MultiImgCapDataLoader``: open each file + decode + the same transform), in one run.

A synthetic COCO-like set is generated in a temporary folder: ``--images`` JPEGs of ``--size`` (default 640x480,
smooth colour fields with noise, quality 90), two captions each, as a LAVIS train annotation file; ``blip2 shard``'s
writer packs it into tars (``--shard-size`` images each), once as the files are and once pre-resized
(``--resize``, shorter side). Every path runs in this one process on one torch thread, so img/s is per core; the
paths take turns run by run and the median is reported. Items are batched as the collator batches them and go
through ``Blip2ImageProcessor(train=True)`` (random resized crop + flip to ``--image-size``) with per-item seeds.

    python benchmarks/bench_data.py                        # 256 images of 640x480, 512 pairs, image size 224
    python benchmarks/bench_data.py --images 512 --resize 256 --iters 5
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common
from blip2.data import MultiImgCapDataLoader
from blip2.data.shards import ShardedCaptions, annotation_images, write_shards
from blip2.processing.image import Blip2ImageProcessor

BATCH = 32


def make_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` JPEGs under root/images and root/train.json (two captions per image, LAVIS train layout)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    records = []
    for index in range(count):
        colour = rng.uniform(0, 255, (3, 3))
        field = np.stack([c[0] + c[1] * xs / width * 0.5 + c[2] * ys / height * 0.5 for c in colour], -1)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(root / "images" / name, quality=90)
        records += [{"image": name, "caption": f"a picture number {index}, caption {k}."} for k in range(2)]
    (root / "train.json").write_text(json.dumps(records))


def run_json(root: Path, processor: Blip2ImageProcessor) -> int:
    dataset = MultiImgCapDataLoader(root, ["train.json"], ["images"])
    items = (dataset[index] for index in range(len(dataset)))
    return transform_all(items, processor)


def run_shards(shard_dir: Path, processor: Blip2ImageProcessor, shuffle_buffer: int) -> int:
    dataset = ShardedCaptions([shard_dir], shuffle_buffer=shuffle_buffer, seed=0, rank=0, world_size=1)
    return transform_all(iter(dataset), processor)


def transform_all(items, processor: Blip2ImageProcessor) -> int:
    """Batch items as the collator does and transform them; the number of pairs done."""
    done, batch = 0, []
    for item in items:
        batch.append(item)
        if len(batch) == BATCH:
            done += transform(batch, processor)
            batch = []
    return done + (transform(batch, processor) if batch else 0)


def transform(batch, processor: Blip2ImageProcessor) -> int:
    kept = [item for item in batch if item is not None]
    seeds = [item.get("seed", item["index"]) for item in kept]
    processor([item["image"] for item in kept], train=True, seeds=seeds)
    return len(kept)


def eval_memory(images: int, texts: int, queries: int = 32, dim: int = 256, k_test: int = 128) -> dict[str, float]:
    """Peak RSS of the sharded retrieval re-rank (``engine.retrieval.topk_scores``, ITC top-k, ITM off) on random
    features of COCO-5K's size, measured in this process (call it in a fresh one: ``--eval-memory-only``)."""
    from blip2.engine import retrieval
    from blip2.models.stage1 import Blip2Qformer

    generator = torch.Generator().manual_seed(0)
    image_feats = F.normalize(torch.randn(images, queries, dim, generator=generator), dim=-1)
    text_feats = F.normalize(torch.randn(texts, dim, generator=generator), dim=-1)
    inputs_mib = (image_feats.numel() + text_feats.numel()) * 4 / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    empty = torch.zeros(0)
    retrieval.topk_scores(None, Blip2Qformer.similarity, image_feats, text_feats, empty, empty, empty, k_test,
                          add_itm=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"inputs_mib": inputs_mib, "before_mib": before, "peak_mib": peak, "seconds": seconds,
            "dense_mib": images * texts * 4 / 2**20}


def print_eval_memory(images: int, texts: int) -> None:
    """Run ``eval_memory`` in a fresh process (its own peak RSS) and print one table."""
    command = [sys.executable, __file__, "--eval-memory-only", f"{images}x{texts}"]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    print()
    print(f"sharded retrieval re-rank, {images} images x {texts} texts, Q=32, E=256, k_test=128, ITM off, one process")
    print()
    row = [f"{result['inputs_mib']:.0f}", f"{result['before_mib']:.0f}", f"{result['peak_mib']:.0f}",
           f"{result['peak_mib'] - result['before_mib']:.0f}", f"{result['dense_mib']:.0f}",
           f"{result['seconds']:.0f}"]
    print(common.markdown_table(["features MiB", "RSS before MiB", "peak RSS MiB", "growth MiB",
                                 "one N x M float32 MiB (not held)", "s"], [row]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="the transform's output size")
    parser.add_argument("--resize", type=int, default=256, help="the pre-resized shards' shorter side")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--eval-size", default="5000x25000", help="IMAGESxTEXTS for the re-rank memory ('' skips)")
    parser.add_argument("--eval-memory-only", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.eval_memory_only:
        print(json.dumps(eval_memory(*(int(v) for v in args.eval_memory_only.split("x")))))
        return
    common.start("cpu", threads=1)
    width, height = (int(v) for v in args.size.split("x"))
    root = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        make_images(root, args.images, (width, height))
        images = annotation_images(root, ["train.json"], ["images"])
        write_shards(images, root / "shards", shard_size=args.shard_size)
        write_shards(images, root / "resized", shard_size=args.shard_size, resize=args.resize)
        processor = Blip2ImageProcessor(image_size=args.image_size)
        paths = {"JSON + image folder": lambda: run_json(root, processor),
                 "tar shards": lambda: run_shards(root / "shards", processor, args.shuffle_buffer),
                 f"tar shards, pre-resized to {args.resize}": lambda: run_shards(root / "resized", processor,
                                                                                  args.shuffle_buffer)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        pairs = {name: fn() for name, fn in paths.items()}  # warm-up: file cache, imports
        for _ in range(args.iters):
            for name, fn in paths.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        print_table(args, times, pairs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.eval_size:
        print_eval_memory(*(int(v) for v in args.eval_size.split("x")))


def print_table(args, times: dict[str, list[float]], pairs: dict[str, int]) -> None:
    base = None
    rows = []
    for name, runs in times.items():
        rate = pairs[name] / statistics.median(runs)
        base = base or rate
        rows.append([name, str(pairs[name]), f"{statistics.median(runs):.2f}", f"{rate:.1f}", f"{rate / base:.2f}x"])
    print(f"{args.images} JPEGs of {args.size} (2 captions each), transform: train, {args.image_size} px, batches of "
          f"{BATCH}; shards of {args.shard_size} images, shuffle buffer {args.shuffle_buffer}; one process, one torch "
          f"thread; median of {args.iters} runs, the paths taking turns")
    print()
    print(common.markdown_table(["path", "pairs", "s per pass", "img/s per core", "vs JSON + folder"], rows))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
