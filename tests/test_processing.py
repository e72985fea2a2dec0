"""Image transforms, caption cleaning, the Q-Former tokenizer and Blip2Processor."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from blip2.config import Blip2Config
from blip2.processing import (
    PREPROCESSOR_CONFIG,
    Blip2ImageProcessor,
    Blip2Processor,
    CaptionTransform,
    ImageLoadError,
    clean_caption,
    clean_question,
    load_image,
    load_tokenizer,
    random_resized_crop_params,
)
from blip2.processing.tokenizer import DEFAULT_VOCAB_FILE
from blip2.registry import CLIP_MEAN, CLIP_STD


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """china.jpg and flower.jpg (640x427 each), real JPEG photos shipped with scikit-learn."""
    return [Image.fromarray(array) for array in load_sample_images().images]


@pytest.fixture(scope="module")
def small_photo(photos: list[Image.Image]) -> Image.Image:
    return photos[0].resize((96, 64), Image.Resampling.BILINEAR)


# ---------------------------------------------------------------------------------------------------- image: eval


@pytest.mark.parametrize("size", [224, 100])
def test_eval_pixels_match_transformers_pil_backend(photos: list[Image.Image], size: int) -> None:
    from transformers import BlipImageProcessorPil

    reference = BlipImageProcessorPil(size={"height": size, "width": size}, image_mean=list(CLIP_MEAN),
                                      image_std=list(CLIP_STD), resample=Image.Resampling.BICUBIC)
    expected = reference(photos, return_tensors="pt")["pixel_values"]
    ours = Blip2ImageProcessor(size)(photos)["pixel_values"]
    assert ours.shape == (2, 3, size, size) and ours.dtype == torch.float32
    # we rescale in float64 and normalize in float32 as transformers does, so the match is in fact bit-exact
    assert (ours - expected).abs().max().item() < 1e-5


def test_eval_accepts_paths_arrays_and_single_images(photos: list[Image.Image], tmp_path) -> None:
    processor = Blip2ImageProcessor(40)
    path = tmp_path / "china.png"
    photos[0].save(path)
    from_pil = processor(photos[0])["pixel_values"]
    array = np.asarray(photos[0])
    assert from_pil.shape == (1, 3, 40, 40)
    for source in (path, str(path), array, np.moveaxis(array, -1, 0).copy()):
        assert torch.equal(processor(source)["pixel_values"], from_pil)


def test_grayscale_and_rgba_images_become_rgb(small_photo: Image.Image) -> None:
    assert load_image(small_photo.convert("L")).mode == "RGB"
    assert load_image(small_photo.convert("RGBA")).mode == "RGB"
    assert load_image(np.zeros((5, 7), np.uint8)).size == (7, 5)
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((5, 7, 3), np.float32))


# --------------------------------------------------------------------------------------------------- image: train


def test_train_output_shape_and_seeded_determinism(small_photo: Image.Image) -> None:
    def draws(seed: int) -> torch.Tensor:
        processor = Blip2ImageProcessor(30, seed=seed)
        return torch.cat([processor([small_photo, small_photo], train=True)["pixel_values"] for _ in range(4)])

    first = draws(0)
    assert first.shape == (8, 3, 30, 30)
    assert torch.equal(first, draws(0))
    assert not torch.equal(first, draws(1))
    assert not torch.equal(first[0], first[1])  # a fresh crop per image


def test_train_is_a_resized_crop_then_flip_for_some_draws(small_photo: Image.Image) -> None:
    processor = Blip2ImageProcessor(32, seed=7)
    twin = random.Random(7)  # replays the processor's draws: crop box, then the flip coin
    evaluate = Blip2ImageProcessor(32)
    flips = set()
    for _ in range(16):
        top, left, h, w = random_resized_crop_params(96, 64, (0.5, 1.0), (3 / 4, 4 / 3), twin)
        flip = twin.random() < 0.5
        flips.add(flip)
        expected = evaluate.preprocess_one(small_photo.crop((left, top, left + w, top + h)))
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(processor.preprocess_one(small_photo, train=True), expected)
    assert flips == {True, False}


def test_train_without_hflip_never_flips(small_photo: Image.Image) -> None:
    processor = Blip2ImageProcessor(32, hflip=False, crop_scale=(1.0, 1.0), crop_ratio=(1.5, 1.5), seed=0)
    whole = Blip2ImageProcessor(32).preprocess_one(small_photo)  # 96x64 is ratio 1.5 at scale 1: the whole image
    for _ in range(6):
        assert torch.equal(processor.preprocess_one(small_photo, train=True), whole)


def test_crop_params_respect_scale_and_ratio() -> None:
    rng = random.Random(0)
    width, height = 640, 427
    fractions, ratios = [], []
    for _ in range(2000):
        top, left, h, w = random_resized_crop_params(width, height, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        fractions.append(h * w / (width * height))
        ratios.append(w / h)
    # crops are at least ~300 px a side here, so rounding h and w moves the area and ratio by under 1%;
    # the widest allowed crop (ratio 4/3, full height) of this 3:2 image covers (427 * 4/3) / 640 = 0.89 of it
    assert 0.49 < min(fractions) < 0.52 and 0.85 < max(fractions) < 0.895
    assert 0.74 < min(ratios) and max(ratios) < 4 / 3 + 0.01


def test_crop_params_fall_back_to_a_center_crop_clamped_to_the_ratio() -> None:
    rng = random.Random(0)
    # no 50-100% crop of a 1000x10 strip has a ratio in [3/4, 4/3]: a 10 x round(10 * 4/3) center crop
    assert random_resized_crop_params(1000, 10, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (0, 493, 10, 13)
    assert random_resized_crop_params(10, 1000, (0.5, 1.0), (3 / 4, 4 / 3), rng) == (493, 0, 13, 10)


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, image: Image.Image, processor: Blip2ImageProcessor) -> None:
        self.image, self.processor = image, processor

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.processor.preprocess_one(self.image, train=True)


def test_dataloader_workers_draw_different_reproducible_augmentations(small_photo: Image.Image) -> None:
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        dataset = _SameImage(small_photo, Blip2ImageProcessor(16, seed=3))
        return list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))

    first = run()
    # items 0 and 1 come from workers 0 and 1, each the first draw of its copy of the processor
    assert not torch.equal(first[0], first[1])
    assert all(torch.equal(a, b) for a, b in zip(first, run()))


# ------------------------------------------------------------------------------------------ image: config files


def test_reads_a_hugging_face_preprocessor_config(tmp_path) -> None:
    hf = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
          "image_mean": list(CLIP_MEAN), "image_processor_type": "BlipImageProcessor", "image_std": list(CLIP_STD),
          "processor_class": "Blip2Processor", "resample": 3, "rescale_factor": 0.00392156862745098,
          "size": {"height": 364, "width": 364}}
    (tmp_path / PREPROCESSOR_CONFIG).write_text(json.dumps(hf))
    processor = Blip2ImageProcessor.from_pretrained(tmp_path)
    assert (processor.image_size, processor.resample, processor.mean) == (364, "bicubic", CLIP_MEAN)
    with pytest.raises(ValueError, match="square"):
        Blip2ImageProcessor.from_dict({**hf, "size": {"height": 224, "width": 300}})
    with pytest.raises(ValueError, match="do_normalize"):
        Blip2ImageProcessor.from_dict({**hf, "do_normalize": False})


def test_image_processor_save_and_load_round_trip(tmp_path) -> None:
    processor = Blip2ImageProcessor(48, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), resample="bilinear",
                                    crop_scale=(0.3, 0.9), hflip=False)
    processor.save_pretrained(tmp_path)
    loaded = Blip2ImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert json.loads((tmp_path / PREPROCESSOR_CONFIG).read_text())["resample"] == 2  # PIL's BILINEAR


def test_image_processor_from_preset_and_config_yaml(tmp_path) -> None:
    assert Blip2ImageProcessor.from_pretrained("blip2_tiny").image_size == 32
    assert Blip2ImageProcessor.from_pretrained("blip2_stage1_vit_g").image_size == 224
    Blip2Config.from_pretrained("blip2_tiny").save_pretrained(tmp_path)
    assert Blip2ImageProcessor.from_pretrained(tmp_path).image_size == 32
    with pytest.raises(FileNotFoundError, match="blip2_tiny"):
        Blip2ImageProcessor.from_pretrained("no_such_preset")


# ----------------------------------------------------------------------------------------------- image: errors


def test_load_image_missing_file_names_the_path(tmp_path) -> None:
    path = tmp_path / "missing.jpg"
    with pytest.raises(ImageLoadError, match=re.escape(str(path)) + ".*no such file"):
        load_image(path)


def test_load_image_garbage_bytes_names_the_path(tmp_path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"this is not a jpeg at all" * 40)
    with pytest.raises(ImageLoadError, match=re.escape(str(path)) + ".*not an image"):
        load_image(path)


def test_load_image_truncated_jpeg_fails_at_load(photos: list[Image.Image], tmp_path) -> None:
    whole, cut = tmp_path / "whole.jpg", tmp_path / "truncated.jpg"
    photos[0].save(whole, quality=90)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert load_image(whole).size == (640, 427)
    with pytest.raises(ImageLoadError, match=re.escape(str(cut)) + ".*truncated"):
        load_image(cut)
    with pytest.raises(ImageLoadError, match="truncated"):
        Blip2ImageProcessor(16)([whole, cut])


# ------------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A Dog, running!!  on the beach.", "a dog, running on the beach"),
        ('He said: "hi" (twice) * # ~ ;end', "he said hi twice end"),
        ("What's up? it's 5-6 o'clock", "what's up? it's 5-6 o'clock"),  # ? ' - and , are kept
        ("  leading and trailing  \n", "leading and trailing"),
        ("the end.\n", "the end"),
        ("line one\nline two", "line one\nline two"),  # a single newline or tab is not whitespace-collapsed
        ("tab\there", "tab\there"),
        ("...", ""),
    ],
)
def test_clean_caption_matches_lavis(raw: str, expected: str) -> None:
    assert clean_caption(raw) == expected


def test_clean_caption_truncates_words_and_prepends_the_prompt() -> None:
    sixty = " ".join(f"w{i}" for i in range(60))
    assert clean_caption(sixty).split(" ") == [f"w{i}" for i in range(50)]
    assert clean_caption("One two. Three four five", max_words=3) == "one two three"
    assert clean_caption("a\nb c", max_words=1) == "a\nb"  # words are split on spaces only
    assert clean_caption("A Cat.", prompt="A photo of ") == "A photo of a cat"  # the prompt is not cleaned
    assert CaptionTransform("a photo of ", max_words=2)("Big Red Dog") == "a photo of big red"


def test_clean_question_deletes_punctuation() -> None:
    assert clean_question('What is the man\'s "name"?  ') == "what is the man's name?"
    assert clean_question("Is it... red!") == "is it red"
    assert clean_question("a b c d", max_words=2) == "a b"


# ------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_and_dec_token() -> None:
    tokenizer = load_tokenizer()
    lines = DEFAULT_VOCAB_FILE.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522
    assert (lines[101], lines[102], lines[0], lines[1037], lines[3899], lines[1012]) == (
        "[CLS]", "[SEP]", "[PAD]", "a", "dog", ".")
    assert tokenizer.is_fast
    assert tokenizer.convert_tokens_to_ids("[DEC]") == tokenizer.bos_token_id == 30522
    assert len(tokenizer) == 30523
    assert tokenizer("a dog.")["input_ids"] == [101, 1037, 3899, 1012, 102]
    assert tokenizer("A DOG.")["input_ids"] == [101, 1037, 3899, 1012, 102]  # lowercases


def test_tokenizer_padding_and_truncation() -> None:
    tokenizer = load_tokenizer()
    texts = ["a dog.", "a man riding a horse on a sandy beach near the ocean at sunset"]
    fixed = tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    assert fixed["input_ids"].shape == (2, 32)
    assert fixed["input_ids"][0, :6].tolist() == [101, 1037, 3899, 1012, 102, 0]
    assert fixed["attention_mask"][0].sum() == 5
    longest = tokenizer(texts, padding="longest", truncation=True, max_length=32, return_tensors="pt")
    assert longest["input_ids"].shape == (2, 16)
    cut = tokenizer(texts, padding="longest", truncation=True, max_length=6, return_tensors="pt")["input_ids"]
    assert cut.shape == (2, 6) and cut[1, 0] == 101 and cut[1, -1] == 102


def test_tokenizer_missing_vocab_names_the_path(tmp_path) -> None:
    path = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_tokenizer(path)


def test_processor_uses_the_rust_tokenizer_and_matches_it() -> None:
    """Speed is measured in benchmarks; here: the fast (Rust) tokenizer is the one used, and its ids are ours."""
    processor = Blip2Processor(Blip2ImageProcessor(32), load_tokenizer())
    captions = [f"A man riding a horse on the beach, number {i}." for i in range(50)]
    assert processor.tokenizer.is_fast
    ids = processor(text=captions)["input_ids"]
    assert ids.shape == (50, 32)
    direct = processor.tokenizer.backend_tokenizer.encode_batch([clean_caption(c) for c in captions])
    for row, encoding in zip(ids.tolist(), direct):
        assert row[: len(encoding.ids)] == encoding.ids[:32]


# ------------------------------------------------------------------------------------------------- processor


def test_processor_round_trip(photos: list[Image.Image]) -> None:
    processor = Blip2Processor.from_pretrained("blip2_tiny")
    assert processor.image_processor.image_size == 32 and processor.max_length == 32
    captions = ["A Dog, running!", "Two cats.  On the man's mat", "\N{UNICORN FACE} stays"]
    out = processor(photos + photos[:1], captions)
    assert out["pixel_values"].shape == (3, 3, 32, 32)
    assert out["input_ids"].shape == out["attention_mask"].shape == (3, 32)
    assert out["input_ids"].dtype == torch.int64
    decoded = processor.batch_decode(out["input_ids"])
    assert decoded[:2] == [clean_caption(c) for c in captions[:2]] == ["a dog, running", "two cats on the man's mat"]
    assert decoded[2] == "[UNK] stays"
    dec = torch.cat([torch.full((3, 1), 30522), out["input_ids"][:, 1:]], dim=1)  # [DEC] replaces [CLS]
    assert processor.batch_decode(dec)[0] == "a dog, running"
    raw = processor(text="Two cats. On a mat", clean=False, padding="longest")
    assert raw["input_ids"].shape == (1, 8) and "pixel_values" not in raw
    assert processor.batch_decode(raw["input_ids"]) == ["two cats. on a mat"]
    with pytest.raises(ValueError, match="images, text or both"):
        processor()


def test_processor_save_and_load(tmp_path, photos: list[Image.Image]) -> None:
    processor = Blip2Processor.from_pretrained("blip2_tiny")
    config = Blip2Config.from_pretrained("blip2_tiny").replace(max_txt_len=20)
    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == DEFAULT_VOCAB_FILE.read_bytes()
    loaded = Blip2Processor.from_pretrained(tmp_path)
    assert loaded.max_length == 20
    assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
    assert len(loaded.tokenizer) == 30523
    assert torch.equal(loaded(photos[:1])["pixel_values"], processor(photos[:1])["pixel_values"])
