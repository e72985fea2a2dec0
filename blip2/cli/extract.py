"""``blip2 extract``: embed an image folder with a stage-1 model into safetensors shards (see
``blip2.engine.extract``); under torchrun the shards are shared out over the processes.

    blip2 extract --images photos/ --model blip2_stage1_vit_g --output features/
    torchrun --nproc_per_node 8 -m blip2 extract --images photos/ --model my_model/ --output features/
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from blip2.engine import distributed
from blip2.engine.extract import extract_features, list_images
from blip2.models import Blip2Qformer

SHOWN_UNREADABLE = 5  # unreadable images named in the warning line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--model", required=True, help="a stage-1 preset name or model folder")
    parser.add_argument("--output", required=True, help="folder for features-NNNNN.safetensors and manifest.json")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--shard_size", type=int, default=1024, help="images per shard file (default 1024)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds a model built at random (blip2_tiny), so every process and rerun gets the same")


def cmd_extract(args: argparse.Namespace) -> int:
    paths = list_images(args.images)  # a missing or empty folder is an error before any model is read
    if args.batch_size < 1 or args.shard_size < 1:
        raise ValueError(f"--batch_size and --shard_size must be >= 1, got {args.batch_size} and {args.shard_size}")
    if os.path.isfile(args.output):
        raise FileExistsError(f"--output {args.output} is a file, not a folder")
    device = distributed.pick_device(args.device)
    distributed.init_from_env(device)
    torch.manual_seed(args.seed)
    model = Blip2Qformer.from_pretrained(args.model).to(device).eval()
    result = extract_features(model, paths, args.output, batch_size=args.batch_size, shard_size=args.shard_size,
                              root=args.images, device=device)
    if distributed.is_main_process():
        print(f"blip2: {result.num_images} images in {result.num_shards} shards under {result.output_dir} "
              f"({len(result.written)} shards written here, {len(result.reused)} already done)")
        if result.unreadable:
            shown = ", ".join(result.unreadable[:SHOWN_UNREADABLE])
            hidden = len(result.unreadable) - SHOWN_UNREADABLE
            more = f" and {hidden} more" if hidden > 0 else ""
            print(f"blip2: warning: skipped {len(result.unreadable)} unreadable images: {shown}{more}", file=sys.stderr)
    if distributed.is_distributed():
        torch.distributed.destroy_process_group()
    return 0
