"""Labelled image sets for zero-shot classification: a class-per-folder tree and CIFAR-100 (python pickle format).

Items are ``dict(image=PIL RGB, label=int, index=int)``; ``classes[label]`` is the readable class name (folder or
CIFAR names with underscores read as spaces), ready for a hypothesis template such as "a picture of {}.".
"""

from __future__ import annotations

import codecs
import importlib
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


class UnsafeFileError(ValueError):
    """A data file asks to run code (a pickle naming a function or class beyond plain data); nothing was run."""


def _numpy_module(name: str):
    """numpy 2 keeps its core under ``numpy._core``; pickles name ``numpy.core`` (numpy 1) or ``numpy._core``."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes into protocol 0-2 pickles as _codecs.encode(text, "latin1"): that one call is allowed
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _cifar_globals() -> dict[tuple[str, str], Any]:
    """Everything a CIFAR-100 python pickle may name: numpy arrays, their dtypes and scalars, and bytes."""
    multiarray, numeric = _numpy_module("multiarray"), _numpy_module("numeric")
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Reads plain containers, strings, numbers and numpy arrays; any other global is refused before it is looked up,
    so a crafted file cannot run code."""

    def __init__(self, handle, path: Path) -> None:
        super().__init__(handle, encoding="bytes")
        self.path = path
        self.allowed = _cifar_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafeFileError(f"{self.path}: refuses to load {module}.{name}: CIFAR-100 files hold only arrays, "
                                  "lists and strings")
        return found


def _unpickle(path: Path, *keys: bytes) -> dict[bytes, Any]:
    """A CIFAR-100 python file holding ``keys``, read by a restricted unpickler (numpy arrays and plain data only)."""
    with path.open("rb") as handle:
        try:
            data = _CifarUnpickler(handle, path).load()
        except UnsafeFileError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
            raise ValueError(f"{path}: not a CIFAR-100 python file (truncated or corrupt: "
                             f"{' '.join(str(err).split()) or type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a CIFAR-100 python file (holds a {type(data).__name__}, expected a dict)")
    missing = [key.decode() for key in keys if key not in data]
    if missing:
        raise ValueError(f"{path}: not a CIFAR-100 python file (no {', '.join(missing)} entry)")
    return data


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
        data = _unpickle(folder / split, b"data", f"{kind}_labels".encode())
        meta = _unpickle(folder / "meta", f"{kind}_label_names".encode())
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
