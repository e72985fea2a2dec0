"""Feature extraction: a stage-1 model embeds a folder of images into safetensors shards, across every process
under torchrun, resumably.

Layout of ``output_dir``::

    features-00000.safetensors   image_feats (n, Q, E) float32: normalized ITC query features, one row per id
    features-00000.json          {"shard", "ids" (one per row, in order), "paths" (the shard's images, readable
                                  or not), "unreadable"}; written after the tensors: its presence marks the shard done
    manifest.json                the finished shards, the unreadable images, "complete"

The images are sorted and cut into shards of ``shard_size``; shard s is done by rank s % W. Each file is written to
a temporary name and renamed, so a killed run leaves whole shards only, and a rerun skips the shards already done.
Images that cannot be read are left out of the tensors and named in the shard's index and the manifest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from blip2.data.classification import IMAGE_EXTENSIONS
from blip2.engine import distributed
from blip2.files import write_atomic, write_json_atomic
from blip2.processing.auto import image_processor_for, model_source
from blip2.processing.image import ImageLoadError, load_image

logger = logging.getLogger("blip2")
IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)  # the suffixes image folders are read by, everywhere
MANIFEST = "manifest.json"
FEATURE_KEY = "image_feats"


def shard_names(shard: int) -> tuple[str, str]:
    """The tensor file and the index file of shard ``shard``."""
    return f"features-{shard:05d}.safetensors", f"features-{shard:05d}.json"


@dataclass
class ExtractResult:
    output_dir: Path
    num_images: int
    num_shards: int
    written: list[int] = field(default_factory=list)  # shards this process wrote in this call
    reused: list[int] = field(default_factory=list)  # shards this process found done already
    unreadable: list[str] = field(default_factory=list)  # every shard's unreadable images (after the last barrier)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder`` (recursively, by suffix), sorted by path."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is not a folder")
    paths = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return paths


def _done_index(output_dir: Path, shard: int, ids: list[str]) -> dict | None:
    """The index of shard ``shard`` if it is done, after checking that it holds these images."""
    index_path = output_dir / shard_names(shard)[1]
    if not index_path.is_file() or not (output_dir / shard_names(shard)[0]).is_file():
        return None
    index = json.loads(index_path.read_text())
    if index.get("paths") != ids:
        raise ValueError(f"{index_path} holds features of other images (another folder or shard_size): "
                         "extract into an empty output folder")
    return index


@torch.no_grad()
def _embed_shard(model, image_processor, paths: Sequence[Path], batch_size: int, device: torch.device,
                 bar) -> tuple[torch.Tensor, list[int], list[int]]:
    """Features of the readable images among ``paths``, their positions, and the unreadable ones' positions."""
    feats, good, bad = [], [], []
    for start in range(0, len(paths), batch_size):
        images, positions = [], []
        for position in range(start, min(len(paths), start + batch_size)):
            try:
                images.append(load_image(paths[position]))
                positions.append(position)
            except (ImageLoadError, OSError) as error:
                logger.debug("skipped %s", error)
                bad.append(position)
        if images:
            pixel_values = image_processor(images)["pixel_values"].to(device)
            feats.append(model.get_image_features(pixel_values).float().cpu())
            good.extend(positions)
        bar.update(min(len(paths), start + batch_size) - start)
    return (torch.cat(feats) if feats else torch.zeros(0)), good, bad


def _write_shard(output_dir: Path, shard: int, ids: list[str], feats: torch.Tensor, good: list[int],
                 bad: list[int]) -> None:
    tensor_name, index_name = shard_names(shard)
    write_atomic(output_dir / tensor_name, lambda temp: save_file({FEATURE_KEY: feats.contiguous()}, str(temp)))
    index = {"shard": shard, "ids": [ids[i] for i in good], "paths": ids, "unreadable": [ids[i] for i in bad]}
    write_json_atomic(output_dir / index_name, index)


def write_manifest(output_dir: Path, shards: list[list[str]], shard_size: int) -> dict:
    """Rebuild ``manifest.json`` from the shards done on disk; returns it."""
    done, unreadable = [], []
    for shard, ids in enumerate(shards):
        index = _done_index(output_dir, shard, ids)
        if index is not None:
            tensor_name, index_name = shard_names(shard)
            done.append({"shard": shard, "file": tensor_name, "index": index_name, "count": len(index["ids"])})
            unreadable.extend(index["unreadable"])
    manifest = {"feature": FEATURE_KEY, "num_images": sum(len(ids) for ids in shards), "shard_size": shard_size,
                "num_shards": len(shards), "shards": done, "unreadable": unreadable,
                "complete": len(done) == len(shards)}
    write_json_atomic(output_dir / MANIFEST, manifest)
    return manifest


def _image_ids(image_paths: Sequence[str | os.PathLike], root: str | os.PathLike | None) -> list[str]:
    if root is None:
        return [Path(path).as_posix() for path in image_paths]
    return [Path(path).relative_to(root).as_posix() for path in image_paths]


def extract_features(model, image_paths: Sequence[str | os.PathLike], output_dir: str | os.PathLike,
                     batch_size: int = 32, shard_size: int = 1024, image_processor=None,
                     root: str | os.PathLike | None = None, device: torch.device | None = None,
                     progress: bool = True, on_shard_written: Callable[[int], None] | None = None) -> ExtractResult:
    """Embed ``image_paths`` (in this order) into shards of ``shard_size`` under ``output_dir``; this process does
    shards s with s % W == its rank, skipping those done already. The ids are the paths relative to ``root``
    (default: the paths as given). ``on_shard_written(s)`` is called after each shard this call writes."""
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    rank, world = distributed.rank(), distributed.world_size()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    device = device or next(model.parameters()).device
    image_processor = image_processor or image_processor_for(model, model_source(model))
    paths, ids = [Path(path) for path in image_paths], _image_ids(image_paths, root)
    shards = [ids[start : start + shard_size] for start in range(0, len(ids), shard_size)]
    result = ExtractResult(output_dir, len(ids), len(shards))
    todo = []
    for shard in range(rank, len(shards), world):
        (result.reused if _done_index(output_dir, shard, shards[shard]) else todo).append(shard)
    total = sum(len(shards[shard]) for shard in todo)
    with tqdm(total=total, desc="extract", unit="img", disable=not (progress and rank == 0)) as bar:
        for shard in todo:
            start = shard * shard_size
            feats, good, bad = _embed_shard(model, image_processor, paths[start : start + shard_size], batch_size,
                                            device, bar)
            _write_shard(output_dir, shard, shards[shard], feats, good, bad)
            result.written.append(shard)
            if rank == 0:  # the manifest lists the shards done so far, should the run be killed
                write_manifest(output_dir, shards, shard_size)
            if on_shard_written is not None:
                on_shard_written(shard)
    distributed.barrier()
    manifest = write_manifest(output_dir, shards, shard_size) if rank == 0 else None
    result.unreadable = distributed.all_gather_objects(manifest)[0]["unreadable"]
    return result


def load_features(output_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every finished shard's features by id (a convenience for small outputs and tests)."""
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    manifest = json.loads((output_dir / MANIFEST).read_text())
    features = {}
    for entry in manifest["shards"]:
        tensors = load_file(str(output_dir / entry["file"]))[FEATURE_KEY]
        ids = json.loads((output_dir / entry["index"]).read_text())["ids"]
        features.update(zip(ids, tensors))
    return features
