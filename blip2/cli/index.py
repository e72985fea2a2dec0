"""``blip2 index``: build or update a searchable image index (see ``blip2.engine.index``): only new and changed
images are embedded, gone ones are dropped, and a killed run resumes where it stopped.

    blip2 index photos/ --model blip2_stage1_vit_g --output photos_index/
    blip2 index shards/ --model my_model/ --output idx/ --pooled      # a folder of webdataset .tar shards
    blip2 index photos/ --output photos_index/                         # update: the model recorded in the index
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from blip2.engine.distributed import pick_device
from blip2.engine.index import PART_SIZE, build_index
from blip2.engine.index_sources import source_paths
from blip2.engine.index_store import HEADER, read_header
from blip2.models import Blip2Qformer

SHOWN_UNREADABLE = 5  # unreadable images named in the warning line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="a folder of images and/or .tar shards (searched recursively), "
                                                  "or .tar shard files")
    parser.add_argument("--output", required=True, help="the index folder (new, or an index to update)")
    parser.add_argument("--model", help="a stage-1 preset name or model folder (default: the one recorded in an "
                                        "existing index)")
    parser.add_argument("--pooled", action="store_true",
                        help="store one pooled vector per image (Q times smaller) instead of all query features")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--part_size", type=int, default=PART_SIZE,
                        help=f"images per part file, the unit a killed run keeps (default {PART_SIZE})")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds a model built at random (blip2_tiny)")


def model_name(args: argparse.Namespace) -> str:
    """--model, else the model recorded in the index being updated."""
    if args.model:
        return args.model
    if (Path(args.output) / HEADER).is_file():
        recorded = read_header(Path(args.output))["model"]
        if recorded:
            return recorded
    raise ValueError(f"--model is required: {args.output} is not an index yet (or records no model name)")


def cmd_index(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.part_size < 1:
        raise ValueError(f"--batch_size and --part_size must be >= 1, got {args.batch_size} and {args.part_size}")
    source_paths(args.images)  # a missing source is an error before any model is read
    name = model_name(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = Blip2Qformer.from_pretrained(name).to(device).eval()
    result = build_index(model, args.images, args.output, batch_size=args.batch_size, pooled=args.pooled,
                         device=device, part_size=args.part_size, model_name=name)
    print(f"blip2: {result.num_images} images: {result.embedded} embedded now, {result.reused} already indexed, "
          f"{len(result.unreadable)} unreadable" + (f"; {len(result.removed)} removed (files gone)"
                                                    if result.removed else "") + f" -> {result.output_dir}")
    if result.unreadable:
        shown = ", ".join(result.unreadable[:SHOWN_UNREADABLE])
        hidden = len(result.unreadable) - SHOWN_UNREADABLE
        more = f" and {hidden} more" if hidden > 0 else ""
        print(f"blip2: warning: skipped {len(result.unreadable)} unreadable images: {shown}{more}", file=sys.stderr)
    return 0
