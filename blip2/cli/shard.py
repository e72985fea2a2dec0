"""``blip2 shard``: write webdataset tar shards (image + captions) for streaming training.

    blip2 shard --dataset_dir data/coco --annotation_files annotations/train.json --image_dirs images --output shards/
    blip2 shard --image_folder photos/ --output shards/ --resize 384 --shard_size 2000

From LAVIS annotation files (JSON or JSONL, each paired with its image folder), or from a folder of images with a
``<name>.txt`` next to each (one caption per line). Train on them with ``data_loader.type: WebDataset`` and
``data_loader.shards: [shards/]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``blip2 shard``'s options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--annotation_files", nargs="+", help="LAVIS annotation files (JSON or JSONL), relative to "
                        "--dataset_dir")
    source.add_argument("--image_folder", type=Path, help="images with a <name>.txt caption file next to each")
    parser.add_argument("--image_dirs", nargs="+", help="the image folder of each annotation file (one each)")
    parser.add_argument("--dataset_dir", default=".", help="the root of --annotation_files and --image_dirs")
    parser.add_argument("--output", required=True, type=Path, help="the folder to write the tars and manifest.json")
    parser.add_argument("--shard_size", type=int, default=1000, help="images per tar (default 1000)")
    parser.add_argument("--resize", type=int, metavar="N", help="shrink each image so its shorter side is N pixels "
                        "(stored as JPEG); default: the files as they are")
    parser.add_argument("--prefix", default="shard", help="tar names: <prefix>-000000.tar, ...")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in --output")


def cmd_shard(args: argparse.Namespace) -> int:
    from blip2.data.shards import annotation_images, folder_images, write_shards

    if args.annotation_files:
        if not args.image_dirs:
            raise ValueError("--annotation_files needs --image_dirs (the image folder of each annotation file)")
        images = annotation_images(args.dataset_dir, args.annotation_files, args.image_dirs)
    else:
        if args.image_dirs:
            raise ValueError("--image_dirs goes with --annotation_files, not --image_folder")
        images = folder_images(args.image_folder)
    manifest = write_shards(images, args.output, shard_size=args.shard_size, resize=args.resize, prefix=args.prefix,
                            overwrite=args.overwrite)
    failed = f"; {manifest['num_failed']} unreadable images left out" if manifest["num_failed"] else ""
    print(f"wrote {len(manifest['shards'])} shards to {args.output}: {manifest['num_samples']} images, "
          f"{manifest['num_pairs']} image-caption pairs{failed}")
    return 0
