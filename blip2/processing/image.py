"""Image loading and the BLIP-2 image transforms (Pillow + torch, no torchvision).

Eval is LAVIS ``blip_image_eval`` / transformers ``BlipImageProcessor``: a square bicubic resize (aspect ratio not
kept, no crop), then rescale and normalize. Train is LAVIS ``blip2_image_train``: RandomResizedCrop (scale 0.5-1,
bicubic), a horizontal flip with p=0.5, then the same rescale and normalize.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from blip2 import files, registry
from blip2.config import Blip2Config
from blip2.registry import CLIP_MEAN, CLIP_STD

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

PREPROCESSOR_CONFIG = "preprocessor_config.json"
RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_NAMES = {int(value): name for name, value in RESAMPLE.items()}
_RESCALE = 1 / 255


class ImageLoadError(ValueError):
    """An image file could not be read; the message names the path and the reason."""


def load_image(source: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or a uint8 array (HWC, CHW or HW), fully decoded."""
    if isinstance(source, Image.Image):
        # a plain convert drops alpha, as LAVIS's Image.open(...).convert("RGB") does (HF composites onto white)
        return source if source.mode == "RGB" else source.convert("RGB")
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"expected a path, a PIL image or a numpy array, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise ImageLoadError(f"cannot load image {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a corrupt or truncated file fails here rather than in a worker later
            return image.convert("RGB")
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"cannot load image {path}: not an image file (unrecognised format)") from err
    except Image.DecompressionBombError as err:  # not an OSError: PIL refuses images over 2x MAX_IMAGE_PIXELS
        raise ImageLoadError(f"cannot load image {path}: too large (decompression bomb limit): "
                             f"{' '.join(str(err).split())}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"cannot load image {path}: corrupt or truncated ({err})") from err


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image arrays must be HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def random_resized_crop_params(
    width: int, height: int, scale: Sequence[float], ratio: Sequence[float], rng: random.Random
) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` drawn from ``rng``: (top, left, crop_height, crop_width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    # fallback: a center crop, clamped to the ratio range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Blip2ImageProcessor:
    """Images to ``pixel_values`` (B, 3, S, S): eval resize, or train random resized crop + flip."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        resample: str = "bicubic",
        crop_scale: Sequence[float] = (0.5, 1.0),
        crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        seed: int | None = None,
    ) -> None:
        if not isinstance(image_size, int) or image_size <= 0:
            raise ValueError(f"image_size={image_size!r} must be a positive int")
        if resample not in RESAMPLE:
            raise ValueError(f"resample={resample!r} must be one of {', '.join(RESAMPLE)}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={tuple(mean)} and std={tuple(std)} need 3 values each, std > 0")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale={tuple(crop_scale)} must satisfy 0 < min <= max <= 1")
        if not 0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio={tuple(crop_ratio)} must satisfy 0 < min <= max")
        self.image_size = image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = resample
        self.crop_scale = tuple(float(s) for s in crop_scale)
        self.crop_ratio = tuple(float(r) for r in crop_ratio)
        self.hflip = hflip
        self.seed = seed
        self.rng = random.Random(seed)
        self._worker_seed: int | None = None
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, images: ImageInput | Sequence[ImageInput], train: bool = False,
                 seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """``seeds`` (one per image) fix each image's crop and flip, whatever process or order it comes in."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("no images given")
        if seeds is not None and len(seeds) != len(batch):
            raise ValueError(f"got {len(seeds)} seeds for {len(batch)} images")
        rngs = [None] * len(batch) if seeds is None else [random.Random(seed) for seed in seeds]
        return {"pixel_values": torch.stack([self.preprocess_one(image, train, rng) for image, rng in zip(batch, rngs)])}

    def preprocess_one(self, image: ImageInput, train: bool = False, rng: random.Random | None = None) -> torch.Tensor:
        """One image to a (3, S, S) float32 tensor; ``rng`` overrides the processor's own random stream."""
        image = load_image(image)
        size = (self.image_size, self.image_size)
        if not train:
            return self._to_tensor(image.resize(size, RESAMPLE[self.resample]))
        rng = rng or self._rng()
        top, left, h, w = random_resized_crop_params(image.width, image.height, self.crop_scale, self.crop_ratio, rng)
        flip = self.hflip and rng.random() < 0.5
        pixels = self._to_tensor(image.crop((left, top, left + w, top + h)).resize(size, RESAMPLE[self.resample]))
        # flipping after normalize is exact: it only permutes pixels
        return pixels.flip(-1) if flip else pixels

    def _to_tensor(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)
        # transformers rescales in float64 and then normalizes in float32; the same order gives identical bits
        # (torchvision's ToTensor divides in float32, which differs by at most one ulp)
        pixels = (pixels.double() * _RESCALE).float()
        return (pixels - self._mean) / self._std

    def _rng(self) -> random.Random:
        # each DataLoader worker holds a copy of this processor; reseed it from the worker's seed (drawn from the
        # torch RNG, so reproducible) or every worker would draw the same crops and flips
        info = torch.utils.data.get_worker_info()
        if info is not None and info.seed != self._worker_seed:
            self._worker_seed = info.seed
            self.rng = random.Random(f"{self.seed}:{info.seed}")
        return self.rng

    def to_dict(self) -> dict[str, Any]:
        """A transformers-compatible ``preprocessor_config.json`` dict, plus our train-transform keys."""
        return {
            "image_processor_type": "BlipImageProcessor",
            "processor_class": "Blip2Processor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": int(RESAMPLE[self.resample]),
            "do_rescale": True,
            "rescale_factor": _RESCALE,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "crop_scale": list(self.crop_scale),
            "crop_ratio": list(self.crop_ratio),
            "hflip": self.hflip,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], seed: int | None = None) -> "Blip2ImageProcessor":
        """Read ours or a Hugging Face BLIP/BLIP-2 ``preprocessor_config.json`` dict (other keys are ignored)."""
        for flag in ("do_resize", "do_rescale", "do_normalize"):
            if data.get(flag) is False:
                raise ValueError(f"preprocessor config {flag}=false is not supported")
        if not math.isclose(data.get("rescale_factor", _RESCALE), _RESCALE):
            raise ValueError(f"preprocessor config rescale_factor={data['rescale_factor']} is not supported (1/255)")
        size = data.get("size", 224)
        if isinstance(size, dict):
            if set(size) != {"height", "width"} or size["height"] != size["width"]:
                raise ValueError(f"preprocessor config size={size} must be square {{height, width}}")
            size = size["height"]
        resample = data.get("resample", "bicubic")
        if isinstance(resample, int):
            if resample not in _RESAMPLE_NAMES:
                raise ValueError(f"preprocessor config resample={resample} is not a PIL resampling filter")
            resample = _RESAMPLE_NAMES[resample]
        return cls(
            image_size=size,
            mean=data.get("image_mean", CLIP_MEAN),
            std=data.get("image_std", CLIP_STD),
            resample=resample,
            crop_scale=data.get("crop_scale", (0.5, 1.0)),
            crop_ratio=data.get("crop_ratio", (3 / 4, 4 / 3)),
            hflip=data.get("hflip", True),
            seed=seed,
        )

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``preprocessor_config.json`` atomically; a folder holding files blip2 did not write is refused
        unless ``overwrite`` (which keeps those files)."""
        directory = files.prepare_output_folder(directory, overwrite)
        files.write_files(directory, {PREPROCESSOR_CONFIG: lambda path: path.write_text(
            json.dumps(self.to_dict(), indent=2), encoding="utf-8")})

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, seed: int | None = None) -> "Blip2ImageProcessor":
        """A preset name (the ``preprocessor_config.json`` in its folder under ``$BLIP2_HOME`` if there is one, else
        the preset's settings), a ``preprocessor_config.json`` (or its folder), or a folder with our ``config.yaml``."""
        source = registry.resolve(name_or_path)
        saved = source.saved_file(PREPROCESSOR_CONFIG)
        if saved is None and source.path.is_file() and source.path.suffix == ".json":
            saved = source.path
        if saved is not None:
            with open(saved, encoding="utf-8") as handle:
                return cls.from_dict(json.load(handle), seed=seed)
        if source.preset is not None:
            config = Blip2Config.from_pretrained(source.name)
            return cls(config.vision_config.image_size, source.preset.image_mean, source.preset.image_std, seed=seed)
        if source.saved_file("config.yaml") is not None:
            return cls(Blip2Config.from_yaml(source.path / "config.yaml").vision_config.image_size, seed=seed)
        raise FileNotFoundError(f"{source.path} has neither {PREPROCESSOR_CONFIG} nor config.yaml")
