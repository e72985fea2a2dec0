"""Image-caption data sets in the LAVIS annotation layout (COCO Karpathy, Visual Genome, Flickr30k; JSON or JSONL).

``MultiImgCapDataLoader`` (the seed's name) reads several annotation files, each paired with its image folder, and
returns a training data set (one item per caption) or a retrieval evaluation data set (one item per image, with
``texts``, ``img2txt`` and ``txt2img`` built as LAVIS ``RetrievalEvalDataset`` builds them). Images are decoded
lazily in ``__getitem__``, so the work happens in DataLoader workers.
"""

from __future__ import annotations

import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from blip2.processing.image import ImageLoadError, load_image
from blip2.processing.text import clean_caption

logger = logging.getLogger(__name__)

STAGES = ("train", "eval")
ON_ERROR = ("skip", "raise")
WORKER_SLOTS = 64  # DataLoader worker w counts in slot 1 + w % 64; slot 0 is the process itself
WARN_FIRST_SKIPS = 5  # after this many skipped images only the counter grows; the trainer logs the total

TextTransform = Callable[[str], str]


def read_annotations(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a LAVIS annotation file: a JSON list of records, or JSONL (one record per line); check each record."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                         "annotation files are JSON or JSONL in UTF-8") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no} is not valid JSON ({err}); annotation files are a JSON "
                                 "list of records or JSONL, one record per line") from None
    for index, record in enumerate(records):
        _check_record(record, path, index)
    return records


def _check_record(record: Any, path: Path, index: int) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: record {index} is a {type(record).__name__}, expected an object")
    missing = [key for key in ("image", "caption") if key not in record]
    if missing:
        names = " or ".join(map(repr, missing))
        raise ValueError(f"{path}: record {index} has no {names} key (keys: {sorted(record)})")
    captions = _captions(record)
    if not isinstance(record["image"], str) or not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(
            f"{path}: record {index} needs 'image' as a string and 'caption' as a string or a non-empty list of "
            f"strings (got image={record['image']!r}, caption={record['caption']!r})"
        )


def _captions(record: dict[str, Any]) -> list[str]:
    caption = record["caption"]
    return caption if isinstance(caption, list) else [caption]


class _LazyImages(Dataset):
    """Shared image loading: decode on access; on a bad file skip (return None, count it) or raise."""

    def __init__(self, on_error: str) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error={on_error!r} must be one of {ON_ERROR}")
        self.on_error = on_error
        # one slot per process in shared memory: skips counted in DataLoader workers (fork, spawn or forkserver)
        # show up in the main process, and no two processes ever write the same slot
        self._skips = torch.zeros(1 + WORKER_SLOTS, dtype=torch.int64).share_memory_()

    @property
    def num_skipped(self) -> int:
        """How many unreadable images ``__getitem__`` has skipped so far (this process and its workers)."""
        return int(self._skips.sum())

    def _load(self, path: str) -> Image.Image | None:
        try:
            return load_image(path)
        except ImageLoadError as err:
            if self.on_error == "raise":
                raise
            worker = get_worker_info()
            slot = 0 if worker is None else 1 + worker.id % WORKER_SLOTS
            self._skips[slot : slot + 1].add_(1)
            count = self.num_skipped
            if count <= WARN_FIRST_SKIPS:
                logger.warning("skipping an item: %s%s", err,  # the error names the path
                               "; further skips are only counted" if count == WARN_FIRST_SKIPS else "")
            return None


class ImageCaptionDataset(_LazyImages):
    """Training pairs: item ``dict(image=PIL RGB, caption=str, index=int, image_id=int)``, or None for an unreadable
    image. ``image_id`` is the same for every caption of one image (retrieval fine-tuning treats such pairs as
    positives of each other); by default each distinct image path is one image."""

    def __init__(self, image_paths: list[str], captions: list[str], on_error: str = "skip",
                 image_ids: list[int] | None = None) -> None:
        super().__init__(on_error)
        if len(image_paths) != len(captions):
            raise ValueError(f"{len(image_paths)} image paths but {len(captions)} captions")
        if image_ids is not None and len(image_ids) != len(captions):
            raise ValueError(f"{len(image_ids)} image ids but {len(captions)} captions")
        self.image_paths = image_paths
        self.captions = captions
        self.image_ids = image_ids if image_ids is not None else contiguous_ids(image_paths)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        image = self._load(self.image_paths[index])
        if image is None:
            return None
        return {"image": image, "caption": self.captions[index], "index": index, "image_id": self.image_ids[index]}


def contiguous_ids(keys: list) -> list[int]:
    """0, 1, 2, ... in order of first appearance: equal keys get equal ids (LAVIS remaps ``image_id`` so)."""
    ids: dict = {}
    return [ids.setdefault(key, len(ids)) for key in keys]


class RetrievalEvalDataset(_LazyImages):
    """Retrieval evaluation: one item per image ``dict(image, index)``, plus ``texts``, ``img2txt``, ``txt2img``.

    With ``repeat_images=True`` there is one item per caption instead:
    ``dict(image, caption, index=text index, image_index)``.
    """

    def __init__(self, image_paths: list[str], captions: list[list[str]], repeat_images: bool = False,
                 on_error: str = "raise") -> None:
        super().__init__(on_error)
        if len(image_paths) != len(captions):
            raise ValueError(f"{len(image_paths)} image paths but {len(captions)} caption lists")
        self.image_paths = image_paths
        self.repeat_images = repeat_images
        self.texts: list[str] = []
        self.img2txt: dict[int, list[int]] = {}
        self.txt2img: dict[int, int] = {}
        for img_id, image_captions in enumerate(captions):
            self.img2txt[img_id] = []
            for caption in image_captions:
                txt_id = len(self.texts)
                self.texts.append(caption)
                self.img2txt[img_id].append(txt_id)
                self.txt2img[txt_id] = img_id

    def __len__(self) -> int:
        return len(self.texts) if self.repeat_images else len(self.image_paths)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        img_id = self.txt2img[index] if self.repeat_images else index
        image = self._load(self.image_paths[img_id])
        if image is None:
            return None
        if self.repeat_images:
            return {"image": image, "caption": self.texts[index], "index": index, "image_index": img_id}
        return {"image": image, "index": index}


def _read_records(ann_paths: list[Path], img_roots: list[Path], transform: TextTransform):
    """Every record's image path, its transformed captions, and its image key: the record's ``image_id`` (per
    annotation file) when it has one, else its image file."""
    image_paths: list[str] = []
    captions: list[list[str]] = []
    image_keys: list[tuple] = []
    for file_index, (ann_path, img_root) in enumerate(zip(ann_paths, img_roots)):
        for record in read_annotations(ann_path):
            image_paths.append(str(img_root / record["image"]))
            captions.append([transform(c) for c in _captions(record)])
            image_keys.append((file_index, str(record["image_id"])) if "image_id" in record
                              else ("path", image_paths[-1]))
    return image_paths, captions, image_keys


def MultiImgCapDataLoader(  # noqa: N802 -- the seed's public name
    dataset_dir: str | os.PathLike,
    annotation_files: list[str],
    image_dirs: list[str],
    stage: str = "train",
    on_error: str | None = None,
    repeat_images: bool = False,
    text_transform: TextTransform | None = None,
    prompt: str = "",
    max_words: int = 50,
) -> ImageCaptionDataset | RetrievalEvalDataset:
    """Build the caption data set for ``stage`` from annotation files paired one-to-one with image folders.

    Args:
        dataset_dir: the root that ``annotation_files`` and ``image_dirs`` are relative to.
        on_error: what an unreadable image does; default "skip" for training, "raise" for evaluation (a skipped
            image would silently change the retrieval metrics).
        text_transform: applied to every caption; default ``clean_caption(max_words=max_words, prompt=prompt)``
            (LAVIS ``blip_caption``). ``prompt`` and ``max_words`` only apply to that default.
        repeat_images: evaluation only: one item per caption instead of one per image.
    """
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r} must be one of {STAGES}")
    if repeat_images and stage != "eval":
        raise ValueError("repeat_images only applies to stage='eval'; training already gives one item per caption")
    if len(annotation_files) != len(image_dirs):
        raise ValueError(
            f"annotation_files and image_dirs must pair one-to-one, got {len(annotation_files)} annotation files "
            f"{list(annotation_files)} and {len(image_dirs)} image dirs {list(image_dirs)}"
        )
    if not annotation_files:
        raise ValueError("annotation_files is empty: give at least one annotation file and its image dir")
    if text_transform is not None and prompt:
        raise ValueError("prompt only applies to the default text transform; add it inside text_transform instead")
    transform = text_transform or partial(clean_caption, max_words=max_words, prompt=prompt)

    root = Path(dataset_dir)
    ann_paths = [root / f for f in annotation_files]
    img_roots = [root / d for d in image_dirs]
    missing = [f"annotation file {p}" for p in ann_paths if not p.is_file()]
    missing += [f"image folder {p}" for p in img_roots if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} data path(s) not found: " + "; ".join(missing))

    image_paths, captions, image_keys = _read_records(ann_paths, img_roots, transform)
    if not image_paths:  # an empty data set fails later and obscurely (an empty torch.cat, a zero-step epoch)
        raise ValueError(f"no annotation records in {', '.join(str(p) for p in ann_paths)}: the data set is empty")

    if stage == "eval":
        return RetrievalEvalDataset(image_paths, captions, repeat_images, on_error or "raise")
    pair_paths = [path for path, caps in zip(image_paths, captions) for _ in caps]
    pair_captions = [c for caps in captions for c in caps]
    pair_ids = contiguous_ids([key for key, caps in zip(image_keys, captions) for _ in caps])
    return ImageCaptionDataset(pair_paths, pair_captions, on_error or "skip", image_ids=pair_ids)
