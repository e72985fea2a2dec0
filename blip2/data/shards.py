"""Image-caption data in webdataset tar shards: a writer (``blip2 shard``) and a streaming reader for training.

Layout of a shard set (one folder)::

    shard-000000.tar ...   webdataset tars; one sample per image: ``<key>.jpg`` (or the source's image type),
                           ``<key>.txt`` (its first caption) and ``<key>.json`` ({"captions", "first_pair",
                           "source"}); keys are the zero-padded image numbers
    manifest.json          {"format", "shards": [{"name", "num_samples", "num_pairs"}], totals, "resize"}

Every file is written under a temporary name and renamed, so a crash never leaves a half-written shard or manifest.

The reader (``ShardedCaptions``) is a ``webdataset.DataPipeline``: the shard list, shuffled by (seed, epoch), is
split over ranks and then over DataLoader workers; each worker reads its tars, turns each image into one item per
caption, shuffles them in a seeded buffer, and decodes with PIL. Items are the same as ``ImageCaptionDataset``'s
(``image``, cleaned ``caption``, global pair ``index``, plus an augmentation ``seed``); an unreadable member is a
None item (skipped by the collator and counted), so the item positions never move. With several shard sets and
``weights`` each worker draws from webdataset's resampled shard streams (``ResampledShards``) in a seeded weighted
mix, with no end; the trainer then takes ``sum of pairs / world size / batch size`` batches per epoch.

The order is fixed by (seed, epoch, rank, worker count): a resumed run skips, in each worker, the items of the
batches it had already consumed (the DataLoader takes batches from its workers in turn), before decoding.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from blip2.data.captions import read_annotations
from blip2.data.classification import IMAGE_EXTENSIONS
from blip2.files import write_atomic
from blip2.processing.image import ImageLoadError, load_image
from blip2.processing.text import clean_caption

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "blip2-caption-shards"
KEY_DIGITS = 9
SHARD_DIGITS = 6
JPEG_QUALITY = 95
WORKER_SLOTS = 64  # skip counters: slot 0 is the process itself, worker w counts in slot 1 + w % 64
WARN_FIRST_SKIPS = 5
IMAGE_KEYS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
ON_ERROR = ("skip", "raise")


# ------------------------------------------------------------------------------------------------------------ writer


def annotation_images(dataset_dir: str | os.PathLike, annotation_files: Sequence[str],
                      image_dirs: Sequence[str]) -> list[tuple[Path, list[str]]]:
    """(image path, its captions) from LAVIS annotation files paired with image folders; an image named by several
    records (the train layout: one record per caption) is one entry with all its captions, in first-seen order."""
    if len(annotation_files) != len(image_dirs) or not annotation_files:
        raise ValueError(f"give annotation files and image dirs one-to-one (got {len(annotation_files)} and "
                         f"{len(image_dirs)})")
    root = Path(dataset_dir)
    images: dict[Path, list[str]] = {}
    for ann, img_dir in zip(annotation_files, image_dirs):
        ann_path, img_root = root / ann, root / img_dir
        if not ann_path.is_file():
            raise FileNotFoundError(f"annotation file not found: {ann_path}")
        if not img_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {img_root}")
        for record in read_annotations(ann_path):
            captions = record["caption"] if isinstance(record["caption"], list) else [record["caption"]]
            images.setdefault(img_root / record["image"], []).extend(captions)
    return list(images.items())


def folder_images(folder: str | os.PathLike) -> list[tuple[Path, list[str]]]:
    """(image path, its captions) for every image under ``folder`` with a sidecar ``<name>.txt`` (one caption per
    non-empty line); images without one are left out, with a warning that counts them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found, missing = [], 0
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        sidecar = path.with_suffix(".txt")
        lines = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines()] \
            if sidecar.is_file() else []
        captions = [line for line in lines if line]
        if captions:
            found.append((path, captions))
        else:
            missing += 1
    if missing:
        logger.warning("%d images under %s have no caption (<name>.txt): left out", missing, folder)
    if not found:
        raise ValueError(f"no captioned images under {folder}: each image needs a <name>.txt next to it")
    return found


def encode_image(path: Path, resize: int | None) -> tuple[bytes, str]:
    """The image's bytes and type: the file as it is, or (``resize``) shrunk so its shorter side is ``resize``
    pixels and saved as JPEG. Raises ImageLoadError for a file that does not decode."""
    image = load_image(path)  # decodes fully: a corrupt source is found here, not in training
    if resize is None:
        ext = path.suffix.lower().lstrip(".")
        return path.read_bytes(), "jpg" if ext == "jpeg" else ext
    scale = resize / min(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "jpg"


def _replace_atomically(path: Path, write: Callable[[Any], None]) -> None:
    """``write(handle)`` fills a binary file that then replaces ``path`` (``blip2.files.write_atomic``)."""
    def write_file(temp: Path) -> None:
        with open(temp, "wb") as handle:
            write(handle)

    write_atomic(path, write_file)


def _write_tar(path: Path, samples: list[dict[str, Any]]) -> None:
    def write(handle) -> None:
        with wds.TarWriter(handle, encoder=False, mtime=0) as sink:  # mtime fixed: the same input, the same bytes
            for sample in samples:
                sink.write(sample)

    _replace_atomically(path, write)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST
    if manifest.exists() or any(out_dir.glob("*.tar")):
        if not overwrite:
            raise FileExistsError(f"{out_dir} already holds shards: choose another folder or pass --overwrite")
        for old in out_dir.glob("*.tar"):
            old.unlink()
        manifest.unlink(missing_ok=True)


def write_shards(images: Iterable[tuple[Path, list[str]]], out_dir: str | os.PathLike, shard_size: int = 1000,
                 resize: int | None = None, prefix: str = "shard", overwrite: bool = False) -> dict[str, Any]:
    """Write (image path, captions) entries as tar shards of ``shard_size`` images plus ``manifest.json``; an image
    that does not decode is left out and counted (``num_failed``). Returns the manifest."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if resize is not None and resize < 1:
        raise ValueError(f"resize={resize} must be >= 1")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    shards: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []
    counts = {"samples": 0, "pairs": 0, "failed": 0}

    def flush() -> None:
        name = f"{prefix}-{len(shards):0{SHARD_DIGITS}d}.tar"
        _write_tar(out_dir / name, pending)
        pairs = sum(len(json.loads(s["json"])["captions"]) for s in pending)
        shards.append({"name": name, "num_samples": len(pending), "num_pairs": pairs})
        pending.clear()

    for path, captions in images:
        try:
            data, ext = encode_image(Path(path), resize)
        except ImageLoadError as err:
            counts["failed"] += 1
            logger.warning("left out: %s", err)
            continue
        meta = {"captions": list(captions), "first_pair": counts["pairs"], "source": str(path)}
        pending.append({"__key__": f"{counts['samples']:0{KEY_DIGITS}d}", ext: data, "txt": captions[0].encode("utf-8"),
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        counts["samples"] += 1
        counts["pairs"] += len(captions)
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not shards:
        raise ValueError(f"no readable images to write ({counts['failed']} failed to decode)")
    manifest = {"format": FORMAT, "version": 1, "shards": shards, "num_samples": counts["samples"],
                "num_pairs": counts["pairs"], "num_failed": counts["failed"], "resize": resize}
    _replace_atomically(out_dir / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=1).encode()))
    return manifest


# ------------------------------------------------------------------------------------------------------------ reader


@dataclass(frozen=True)
class ShardSet:
    """One folder of shards, read from its manifest: tar paths, pairs per tar, and its first global pair index."""

    root: str
    paths: tuple[str, ...]
    pairs: tuple[int, ...]
    offset: int = 0

    @property
    def num_pairs(self) -> int:
        return sum(self.pairs)


def read_manifest(source: str | os.PathLike, offset: int = 0) -> ShardSet:
    """A shard set from its folder (holding manifest.json) or the manifest file itself."""
    path = Path(source)
    manifest_path = path / MANIFEST if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no shard manifest at {manifest_path} (write shards with `blip2 shard`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest_path}: not a shard manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("shards"):
        raise ValueError(f"{manifest_path}: not a {FORMAT} manifest with at least one shard")
    root = manifest_path.parent
    entries = manifest["shards"]
    return ShardSet(str(root), tuple(str(root / e["name"]) for e in entries),
                    tuple(int(e["num_pairs"]) for e in entries), offset)


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts; the same in every process (string seeding hashes with SHA-512)."""
    return random.Random(":".join(map(str, parts))).getrandbits(63)


def consumed_per_worker(batches_per_worker: Sequence[float], batches_done: int) -> tuple[list[int], int]:
    """How many batches each worker gave for the first ``batches_done`` of the DataLoader, and which worker gives
    the next one. The DataLoader takes one batch from each worker in turn, passing over workers that have run out
    (``math.inf``: a worker that never does)."""
    consumed = [0] * len(batches_per_worker)
    left, last = batches_done, -1
    while left > 0 and any(c < n for c, n in zip(consumed, batches_per_worker)):
        for worker, total in enumerate(batches_per_worker):
            if left > 0 and consumed[worker] < total:
                consumed[worker] += 1
                left, last = left - 1, worker
    return consumed, (last + 1) % len(batches_per_worker)


def _default_rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ShardedCaptions(IterableDataset):
    """Training pairs streamed from tar shards (see the module docstring).

    Args:
        sources: shard-set folders (or their manifest files); several with ``weights`` make a resampled mix.
        weights: one positive weight per source (a mix); None with several sources: by their pair counts.
        shuffle: shuffle the shard order per epoch and the items in a buffer of ``shuffle_buffer``.
        rank, world_size: this process's share (default: torch.distributed, else $RANK / $WORLD_SIZE, else 0 / 1).
        on_error: an unreadable member: "skip" (a None item, counted in ``num_skipped``) or "raise".
    """

    def __init__(self, sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, *,
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, prompt: str = "", max_words: int = 50,
                 text_transform: Callable[[str], str] | None = None, on_error: str = "skip") -> None:
        if not sources:
            raise ValueError("no shard sets given")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        if weights is not None and (len(weights) != len(sources) or min(weights) <= 0):
            raise ValueError(f"weights={list(weights)} must be one positive number per shard set ({len(sources)})")
        self.sets: list[ShardSet] = []
        for source in sources:
            self.sets.append(read_manifest(source, offset=sum(s.num_pairs for s in self.sets)))
        self.mixed = len(self.sets) > 1
        self.weights = list(weights) if weights is not None else [s.num_pairs for s in self.sets]
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.text_transform = text_transform or partial(clean_caption, max_words=max_words, prompt=prompt)
        self.on_error = on_error
        self.epoch, self.skip_batches, self.batch_size, self.drop_last = 0, 0, 1, False
        self._skips = torch.zeros(1 + WORKER_SLOTS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        """Pairs in all the shard sets (one epoch over every rank)."""
        return sum(s.num_pairs for s in self.sets)

    @property
    def num_skipped(self) -> int:
        """Unreadable members met so far (this process and its DataLoader workers)."""
        return int(self._skips.sum())

    def set_epoch(self, epoch: int, skip_batches: int = 0, batch_size: int = 1, drop_last: bool = False,
                  seed: int | None = None) -> None:
        """The next iteration reads ``epoch`` and leaves out the first ``skip_batches`` batches of ``batch_size``
        that a DataLoader over this data set would give (as it would batch them: ``drop_last``); ``seed``: the run's
        seed (None: keep the one given)."""
        self.epoch, self.skip_batches, self.batch_size, self.drop_last = epoch, skip_batches, batch_size, drop_last
        if seed is not None:
            self.seed = seed

    # --- the plan: which shards each rank and worker reads ---------------------------------------------------------
    def rank_and_world(self) -> tuple[int, int]:
        default_rank, default_world = _default_rank_and_world()
        rank = default_rank if self.rank is None else self.rank
        world = default_world if self.world_size is None else self.world_size
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} must be in [0, world_size={world})")
        return rank, world

    def worker_shards(self, epoch: int, rank: int, world: int, worker: int, num_workers: int) -> list[int]:
        """Indices (into the one shard set) of the tars one worker reads in an epoch, in order."""
        order = list(range(len(self.sets[0].paths)))
        if self.shuffle:
            random.Random(stream_seed("shards", self.seed, epoch)).shuffle(order)  # the same on every rank
        return order[rank::world][worker::num_workers]

    def worker_batches(self, rank: int, world: int, num_workers: int, batch_size: int,
                       drop_last: bool) -> list[float]:
        """Batches each worker of a rank gives in an epoch (``math.inf`` for a mix, whose streams never end)."""
        workers = max(1, num_workers)
        if self.mixed:
            return [math.inf] * workers
        pairs = self.sets[0].pairs
        counts = [sum(pairs[i] for i in self.worker_shards(0, rank, world, w, workers)) for w in range(workers)]
        return [n // batch_size if drop_last else math.ceil(n / batch_size) for n in counts]

    def batches_per_epoch(self, batch_size: int, drop_last: bool, num_workers: int) -> int:
        """Batches every rank takes per epoch: the fewest any rank has (one shard set), or ``pairs / world size /
        batch size`` (a mix), so that all ranks take the same number of steps."""
        _, world = self.rank_and_world()
        if self.mixed:
            return len(self) // world // batch_size
        shards = len(self.sets[0].paths)
        if shards < world:
            raise ValueError(f"{shards} shards cannot be split over {world} processes: write at least one shard per "
                             "process (a smaller `blip2 shard --shard_size`)")
        return min(sum(self.worker_batches(r, world, num_workers, batch_size, drop_last)) for r in range(world))

    # --- iteration ---------------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        rank, world = self.rank_and_world()
        info = get_worker_info()
        process, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        batches = self.worker_batches(rank, world, num_workers, self.batch_size, self.drop_last)
        consumed, next_worker = consumed_per_worker(batches, self.skip_batches)
        # a fresh DataLoader asks worker process 0 first: it plays the worker whose turn came next
        worker = (process + next_worker) % num_workers
        skip_items = consumed[worker] * self.batch_size
        where = (self.seed, self.epoch, rank, worker)
        items = self._mixed_items(where) if self.mixed else self._items(where, world, num_workers)
        stages: list[Any] = [lambda: items]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      rng=random.Random(stream_seed("items", *where))))
        stages.append(lambda items: islice(items, skip_items, None))  # before decoding: skipping costs no decode
        stages.append(self._decode_all)
        return iter(wds.DataPipeline(*stages))

    def _tar_stages(self, shard_set: ShardSet) -> list[Any]:
        return [wds.tarfile_to_samples(handler=self._tar_error), partial(self._pairs, offset=shard_set.offset)]

    def _items(self, where: tuple[int, ...], world: int, num_workers: int) -> Iterator[dict[str, Any]]:
        seed, epoch, rank, worker = where
        shard_set = self.sets[0]
        urls = [{"url": shard_set.paths[i]} for i in self.worker_shards(epoch, rank, world, worker, num_workers)]
        return iter(wds.DataPipeline(lambda: iter(urls), *self._tar_stages(shard_set)))

    def _mixed_items(self, where: tuple[int, ...]) -> Iterator[dict[str, Any]]:
        """A seeded weighted draw over the shard sets, each an endless stream of resampled shards."""
        streams = []
        for number, shard_set in enumerate(self.sets):
            shards = wds.ResampledShards(list(shard_set.paths), deterministic=True,
                                         worker_seed=partial(stream_seed, "resampled", number, *where))
            streams.append(iter(wds.DataPipeline(shards, *self._tar_stages(shard_set))))
        rng = random.Random(stream_seed("mix", *where))
        while True:
            yield next(streams[rng.choices(range(len(streams)), weights=self.weights)[0]])

    def _tar_error(self, error: Exception) -> bool:
        """A tar that cannot be read (truncated, not a tar): counted, and the rest of that tar is passed over."""
        self._count_skip(f"unreadable shard member: {error}")
        return True

    def _pairs(self, samples: Iterable[dict[str, Any]], offset: int) -> Iterator[dict[str, Any]]:
        """One raw item per caption of each sample (its image still encoded)."""
        for sample in samples:
            image_key = next((key for key in IMAGE_KEYS if key in sample), None)
            try:
                meta = json.loads(sample["json"])
                captions, first = meta["captions"], int(meta["first_pair"])
            except (KeyError, ValueError, TypeError):
                yield {"error": f"{sample.get('__url__')}: sample {sample.get('__key__')} has no valid .json"}
                continue
            for number, caption in enumerate(captions):
                yield {"data": sample.get(image_key), "caption": caption, "index": offset + first + number,
                       "image_id": offset + first,  # the sample's first caption: one id per image
                       "name": f"{sample.get('__url__')}:{sample.get('__key__')}.{image_key}"}

    def _decode_all(self, items: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any] | None]:
        for item in items:
            yield self._decode(item)

    def _decode(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """PIL decoding and caption cleaning; an unreadable member is None (counted), or raises (on_error)."""
        try:
            if "error" in item:
                raise ImageLoadError(item["error"])
            if item["data"] is None:
                raise ImageLoadError(f"{item['name']}: no image member")
            with Image.open(io.BytesIO(item["data"])) as image:
                image.load()
                rgb = image.convert("RGB")
        except (ImageLoadError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if self.on_error == "raise":
                raise ImageLoadError(f"cannot decode {item.get('name')}: {err}") from err
            self._count_skip(f"cannot decode {item.get('name')}: {err}")
            return None
        index = item["index"]
        return {"image": rgb, "caption": self.text_transform(item["caption"]), "index": index,
                "image_id": item["image_id"],
                "seed": stream_seed("augment", self.seed, self.epoch, index)}

    def _count_skip(self, message: str) -> None:
        worker = get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % WORKER_SLOTS
        self._skips[slot: slot + 1].add_(1)
        count = self.num_skipped
        if count <= WARN_FIRST_SKIPS:
            logger.warning("skipping an item: %s%s", message,
                           "; further skips are only counted" if count == WARN_FIRST_SKIPS else "")

