"""Labelled image sets for zero-shot classification: a class-per-folder tree and CIFAR-100 (python pickle format).

Items are ``dict(image=PIL RGB, label=int, index=int)``; ``classes[label]`` is the readable class name (folder or
CIFAR names with underscores read as spaces), ready for a hypothesis template such as "a picture of {}.".
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from blip2.processing.image import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_SPLITS = ("train", "test")


def readable_class_name(name: str) -> str:
    """Folder or CIFAR class name to prompt text: ``"maple_tree"`` -> ``"maple tree"``."""
    return name.replace("_", " ")


class ImageFolderDataset(Dataset):
    """``root/<class name>/<image>``: classes are the sorted folder names; images are decoded on access."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder data set not found: {self.root}")
        self.class_dirs = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.class_dirs:
            raise ValueError(f"{self.root} has no class folders; expected {self.root}/<class name>/<image>")
        self.classes = [readable_class_name(name) for name in self.class_dirs]
        self.samples: list[tuple[str, int]] = [
            (str(path), label)
            for label, name in enumerate(self.class_dirs)
            for path in sorted((self.root / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"{self.root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": load_image(path), "label": label, "index": index}


def _unpickle(path: Path) -> dict[bytes, Any]:
    # CIFAR ships as python pickles; only open files you trust
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


class Cifar100Dataset(Dataset):
    """CIFAR-100 from ``root/cifar-100-python/{train,test,meta}`` (``root`` may also be that folder itself)."""

    def __init__(self, root: str | os.PathLike, split: str = "test", fine_label: bool = True) -> None:
        if split not in CIFAR100_SPLITS:
            raise ValueError(f"split={split!r} must be one of {CIFAR100_SPLITS}")
        root = Path(root)
        folder = root if root.name == CIFAR100_FOLDER else root / CIFAR100_FOLDER
        missing = [str(p) for p in (folder / split, folder / "meta") if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"CIFAR-100 file(s) not found: {', '.join(missing)} "
                                    f"(expected the extracted cifar-100-python.tar.gz under {root})")
        kind = "fine" if fine_label else "coarse"
        data = _unpickle(folder / split)
        meta = _unpickle(folder / "meta")
        rows = np.asarray(data[b"data"], dtype=np.uint8)  # (N, 3072): R, G, B planes of 32x32
        self.images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
        self.labels = [int(label) for label in data[f"{kind}_labels".encode()]]
        self.classes = [readable_class_name(name.decode()) for name in meta[f"{kind}_label_names".encode()]]
        if len(self.labels) != len(self.images):
            raise ValueError(f"{folder / split}: {len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": Image.fromarray(self.images[index]), "label": self.labels[index], "index": index}
