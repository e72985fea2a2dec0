"""A generated image-caption data set for the demo and the tests: coloured shapes on a dark background.

Each image holds one shape (circle, square, triangle, cross) in one colour (red, green, blue, yellow), small or
large, at one of nine positions, on a plain or lightly noisy background. Captions come from varied templates; every
caption names the colour and the shape, so a tiny Q-Former trained a few minutes on CPU can learn both, and
``shapes_caption_fields`` scores a generated caption. Layout under ``out_dir``::

    annotations/train.json   LAVIS train layout: one record per caption
    annotations/test.json    LAVIS eval layout: one record per image, "caption" is a list
    images/{train,test}/NNNNN.png
    classes/<colour>_<shape>/NNN.png   held-out images (own random stream) for zero-shot classification
    vocab.txt                the bert-base-uncased word pieces these captions and prompts use (see ``write_vocab``)
    dataset_info.json

The same arguments give byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from blip2.data.classification import readable_class_name

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("circle", "square", "triangle", "cross")
# radius / image size. Large enough that a frozen random ViT with 8-pixel patches tells the four shapes apart (the
# quickstart recipe, 1200 steps: zero-shot top-1 86% with 0.10-0.13 / 0.19-0.23, 90-92% with these); a large shape at
# a corner may touch the edge
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.16), "large": (0.22, 0.26)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_JITTER = 15  # per channel, so a colour is a tight cluster rather than one exact value
CENTRE_JITTER = 0.03  # of the image size
NOISE_STD = 8.0
WHERE: dict[str, tuple[str, ...]] = {
    "top left": ("in the top left", "at the top left", "in the upper left corner"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "top right": ("in the top right", "at the top right", "in the upper right corner"),
    "left": ("on the left", "on the left side", "at the left of the image"),
    "center": ("in the center", "in the middle", "in the middle of the image"),
    "right": ("on the right", "on the right side", "at the right of the image"),
    "bottom left": ("in the bottom left", "at the bottom left", "in the lower left corner"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "bottom right": ("in the bottom right", "at the bottom right", "in the lower right corner"),
}
BACKGROUND_WORDS = {False: ("plain", "dark"), True: ("noisy", "grainy")}
TEMPLATES = (
    "a {size} {colour} {shape} {where}.",
    "there is a {size} {colour} {shape} {where}.",
    "a {colour} {shape} {where}.",
    "a picture of a {size} {colour} {shape}.",
    "{where} there is a {colour} {shape}.",
    "the image shows a {colour} {shape} {where}.",
    "a {size} {shape}, coloured {colour}, {where}.",
    "a {colour} {shape} on a {background} background.",
    "one {size} {colour} {shape}.",
    "{colour} {shape}",
)
TRAIN_ANNOTATION = "annotations/train.json"
TEST_ANNOTATION = "annotations/test.json"
IMAGE_DIR = "images"
CLASSES_DIR = "classes"
INFO_FILE = "dataset_info.json"
VOCAB_FILE = "vocab.txt"
PROMPT_WORDS = "this is a photo of an image picture."  # the zero-shot templates' words
NUM_SPECIAL_PIECES = 104  # bert-base-uncased ids 0..103: [PAD], [unused0..98], [UNK], [CLS], [SEP], [MASK]


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; every caption of the image is drawn from these fields."""

    colour: str
    shape: str
    size: str
    position: str
    noisy: bool


@dataclass
class ShapesDatasetInfo:
    """Where the generated files are; the annotation and image paths are relative to ``root``, as
    ``MultiImgCapDataLoader(root, [train_annotation], [image_dir])`` takes them."""

    root: Path
    train_annotation: str
    test_annotation: str
    image_dir: str
    classes_dir: str
    classes: list[str]  # readable names ("red circle"), in the label order of ImageFolderDataset(root/classes_dir)


def shapes_caption_fields(caption: str) -> tuple[str | None, str | None]:
    """The first colour and the first shape a caption names (None where it names none); plurals count."""
    words = re.findall(r"[a-z]+", caption.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((s for w in words for s in _shape_forms(w) if s in SHAPES), None)
    return colour, shape


def _shape_forms(word: str) -> tuple[str, ...]:
    if word.endswith("es"):
        return word, word[:-1], word[:-2]  # "circles" -> "circle", "crosses" -> "cross"
    return (word, word[:-1]) if word.endswith("s") else (word,)


def _centre(position: str) -> tuple[float, float]:
    x = 0.27 if "left" in position else 0.73 if "right" in position else 0.5
    y = 0.27 if "top" in position else 0.73 if "bottom" in position else 0.5
    return x, y


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]  # rng.choice is slow on short lists and returns np.str_


def _sample_spec(rng: np.random.Generator, colour: str, shape: str) -> ShapeSpec:
    size = _pick(rng, list(SIZES))
    position = _pick(rng, list(WHERE))
    return ShapeSpec(colour, shape, size, position, bool(rng.random() < 0.5))


def render_shape(spec: ShapeSpec, rng: np.random.Generator, image_size: int) -> Image.Image:
    """Draw ``spec`` on a dark grey background; ``rng`` jitters shade, colour, radius and centre."""
    s = image_size
    pixels = np.full((s, s, 3), rng.integers(15, 60), dtype=np.float32)
    if spec.noisy:
        pixels += rng.normal(0.0, NOISE_STD, size=(s, s, 3))
    image = Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[spec.colour]) + jitter, 0, 255))
    r = rng.uniform(*SIZES[spec.size]) * s
    fx, fy = _centre(spec.position)
    cx = (fx + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)) * s
    cy = (fy + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)) * s
    draw = ImageDraw.Draw(image)
    if spec.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif spec.shape == "square":
        h = 0.85 * r  # about the circle's area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif spec.shape == "cross":
        t = 0.22 * r  # thin arms: a thick cross at 8-pixel patches reads as a blob, like a circle
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; choose from {SHAPES}")
    return image


def make_captions(spec: ShapeSpec, rng: np.random.Generator, count: int) -> list[str]:
    """``count`` captions from distinct templates, each naming the colour and the shape."""
    captions = []
    for t in rng.choice(len(TEMPLATES), size=count, replace=False):
        text = TEMPLATES[t].format(
            size=_pick(rng, SIZE_WORDS[spec.size]), colour=spec.colour, shape=spec.shape,
            where=_pick(rng, WHERE[spec.position]), background=_pick(rng, BACKGROUND_WORDS[spec.noisy]),
        )
        captions.append(text[0].upper() + text[1:])
    return captions


def vocabulary_words() -> list[str]:
    """Every word a caption or a zero-shot prompt of this data set can contain."""
    texts = [*TEMPLATES, *COLOURS, *SHAPES, PROMPT_WORDS]
    texts += [w for words in (*SIZE_WORDS.values(), *WHERE.values(), *BACKGROUND_WORDS.values()) for w in words]
    return sorted({w for text in texts for w in re.findall(r"[a-z]+|[.,]", re.sub(r"{[a-z]+}", " ", text.lower()))})


def write_vocab(path: str | os.PathLike, full_vocab_file: str | os.PathLike | None = None) -> int:
    """Write the bert-base-uncased word pieces the shapes captions use, in their original order; return the count.

    The first ``NUM_SPECIAL_PIECES`` entries are kept as they are, so [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102 and
    [MASK]=103 keep their ids, and ``[DEC]`` becomes the id after the last piece. A Q-Former over this vocabulary
    tokenizes exactly as over the full one but has a ~200-row instead of a 30523-row embedding and LM head, which
    makes the demo's training steps several times faster on a CPU.
    """
    from blip2.processing.tokenizer import DEFAULT_VOCAB_FILE, load_tokenizer

    full = load_tokenizer(full_vocab_file)
    pieces = {piece for word in vocabulary_words() for piece in full.tokenize(word)}
    lines = Path(full_vocab_file or DEFAULT_VOCAB_FILE).read_text(encoding="utf-8").splitlines()
    kept = lines[:NUM_SPECIAL_PIECES] + [line for line in lines[NUM_SPECIAL_PIECES:] if line in pieces]
    Path(path).write_text("\n".join(kept) + "\n", encoding="utf-8")
    return len(kept)


def _prepare(out_dir: Path) -> None:
    """Reuse a folder this generator wrote (its old files are removed); refuse any other non-empty folder."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / INFO_FILE).is_file():
            raise FileExistsError(f"{out_dir} is not empty and holds no {INFO_FILE}; pick an empty or new folder")
        for name in ("annotations", IMAGE_DIR, CLASSES_DIR):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    for sub in ("annotations", f"{IMAGE_DIR}/train", f"{IMAGE_DIR}/test", CLASSES_DIR):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)


def _balanced_classes(rng: np.random.Generator, count: int, classes: list[tuple[str, str]]) -> list[tuple[str, str]]:
    order = rng.permutation(np.arange(count) % len(classes))
    return [classes[i] for i in order]


def _write_split(out: Path, split: str, rng: np.random.Generator, count: int, pairs: list[tuple[str, str]],
                 image_size: int, captions_per_image: int) -> list[tuple[str, ShapeSpec, list[str]]]:
    """Render ``count`` images of ``split`` (classes cycled evenly); return (relative path, spec, captions)."""
    rows = []
    for i, (colour, shape) in enumerate(_balanced_classes(rng, count, pairs)):
        spec = _sample_spec(rng, colour, shape)
        name = f"{split}/{i:05d}.png"
        _save_png(render_shape(spec, rng, image_size), out / IMAGE_DIR / name)
        rows.append((name, spec, make_captions(spec, rng, captions_per_image)))
    return rows


def _save_png(image: Image.Image, path: Path) -> None:
    image.save(path, compress_level=1)  # tiny images: fast compression matters more than size


def _write_records(path: Path, records: list[dict[str, object]]) -> None:
    """A JSON list written one record per line: valid JSON for LAVIS readers, and easy to read and diff."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")


def generate_shapes_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 2000,
    num_test: int = 200,
    image_size: int = 64,
    seed: int = 0,
    captions_per_image: int = 3,
    images_per_class: int = 10,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
) -> ShapesDatasetInfo:
    """Write the shapes data set under ``out_dir`` (see the module docstring) and say where its parts are.

    Classes are every colour x shape pair; train and test cycle through them evenly. The train, test and class
    images come from three independent random streams of ``seed``.
    """
    bad = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"unknown colour or shape {bad}; colours: {list(COLOURS)}, shapes: {list(SHAPES)}")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image={captions_per_image} must be between 1 and {len(TEMPLATES)}")
    out = Path(out_dir)
    _prepare(out)
    pairs = [(c, s) for c in colours for s in shapes]
    train_rng, test_rng, class_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    train_records = [
        {"image": name, "caption": caption, "image_id": i, **vars(spec)}
        for i, (name, spec, captions) in enumerate(_write_split(out, "train", train_rng, num_train, pairs,
                                                                image_size, captions_per_image))
        for caption in captions
    ]
    test_records = [
        {"image": name, "caption": captions, "image_id": i, **vars(spec)}
        for i, (name, spec, captions) in enumerate(_write_split(out, "test", test_rng, num_test, pairs,
                                                                image_size, captions_per_image))
    ]
    class_names = sorted(f"{c}_{s}" for c, s in pairs)
    for class_name in class_names:
        colour, shape = class_name.split("_")
        (out / CLASSES_DIR / class_name).mkdir()
        for i in range(images_per_class):
            spec = _sample_spec(class_rng, colour, shape)
            _save_png(render_shape(spec, class_rng, image_size), out / CLASSES_DIR / class_name / f"{i:03d}.png")

    write_vocab(out / VOCAB_FILE)
    _write_records(out / TRAIN_ANNOTATION, train_records)
    _write_records(out / TEST_ANNOTATION, test_records)
    info = ShapesDatasetInfo(out, TRAIN_ANNOTATION, TEST_ANNOTATION, IMAGE_DIR, CLASSES_DIR,
                             [readable_class_name(n) for n in class_names])
    (out / INFO_FILE).write_text(json.dumps({
        "name": "shapes", "seed": seed, "image_size": image_size, "num_train": num_train, "num_test": num_test,
        "captions_per_image": captions_per_image, "images_per_class": images_per_class,
        "colours": list(colours), "shapes": list(shapes), "class_folders": class_names,
        **{k: v for k, v in asdict(info).items() if k != "root"},
    }, indent=1) + "\n", encoding="utf-8")
    return info
