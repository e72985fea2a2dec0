"""Data sets, collation and the generated shapes data set: parsing, errors we promise, skipping, determinism."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2.data import (
    Cifar100Dataset,
    ImageCaptionDataset,
    ImageCollator,
    ImageFolderDataset,
    ImageTextCollator,
    MultiImgCapDataLoader,
    RetrievalEvalDataset,
    generate_shapes_dataset,
    shapes_caption_fields,
)
from blip2.processing import Blip2ImageProcessor, ImageLoadError, load_tokenizer


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def _write_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


@pytest.fixture
def coco_like(tmp_path: Path) -> Path:
    """dataset_dir with a LAVIS train file, its JSONL twin and a 3-image eval file, all over images/val2014."""
    for name in ("a", "b", "c"):
        _png(tmp_path / "images" / "val2014" / f"{name}.jpg")
    train = [
        {"image": "val2014/a.jpg", "caption": "A woman eating fresh vegetables from a bowl.", "image_id": "coco_1"},
        {"image": "val2014/b.jpg", "caption": "Two  DOGS (playing)!", "image_id": "coco_2"},
        {"image": "val2014/c.jpg", "caption": ["first of c.", "second of c"], "image_id": "coco_3"},
    ]
    _write_json(tmp_path / "annotations" / "train.json", train)
    (tmp_path / "annotations" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train) + "\n\n")
    test = [
        {"image": "val2014/a.jpg", "caption": ["a one.", "a two."]},
        {"image": "val2014/b.jpg", "caption": ["b one", "b two", "b three"]},
        {"image": "val2014/c.jpg", "caption": ["c one"]},
    ]
    _write_json(tmp_path / "annotations" / "test.json", test)
    return tmp_path


# --- captions -----------------------------------------------------------------------------------------------------
def test_train_json_gives_one_cleaned_item_per_caption(coco_like: Path) -> None:
    ds = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"])
    assert isinstance(ds, ImageCaptionDataset)
    assert ds.captions == ["a woman eating fresh vegetables from a bowl", "two dogs playing", "first of c",
                           "second of c"]
    assert ds.image_paths[2] == ds.image_paths[3] == str(coco_like / "images" / "val2014" / "c.jpg")
    item = ds[1]
    assert set(item) == {"image", "caption", "index", "image_id"}
    assert item["index"] == 1 and item["caption"] == "two dogs playing"
    assert ds.image_ids[2] == ds.image_ids[3] and len(set(ds.image_ids)) == 3  # the two captions of c.jpg: one image
    assert item["image"].mode == "RGB" and item["image"].size == (12, 12)


def test_jsonl_annotations_read_like_json(coco_like: Path) -> None:
    from_json = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"])
    from_jsonl = MultiImgCapDataLoader(coco_like, ["annotations/train.jsonl"], ["images"])
    assert from_jsonl.captions == from_json.captions
    assert from_jsonl.image_paths == from_json.image_paths


def test_several_annotation_files_are_concatenated_with_their_own_image_dirs(coco_like: Path) -> None:
    _png(coco_like / "vg" / "VG_100K" / "1.jpg")
    _write_json(coco_like / "vg" / "vg_caption.json", [{"image": "VG_100K/1.jpg", "caption": "a tree", "image_id": 1}])
    ds = MultiImgCapDataLoader(coco_like, ["vg/vg_caption.json", "annotations/train.json"], ["vg", "images"])
    assert len(ds) == 5
    assert ds.image_paths[0] == str(coco_like / "vg" / "VG_100K" / "1.jpg") and ds.captions[0] == "a tree"


def test_eval_json_builds_img2txt_and_txt2img_as_lavis(coco_like: Path) -> None:
    ds = MultiImgCapDataLoader(coco_like, ["annotations/test.json"], ["images"], stage="eval")
    assert isinstance(ds, RetrievalEvalDataset)
    assert ds.texts == ["a one", "a two", "b one", "b two", "b three", "c one"]
    assert ds.img2txt == {0: [0, 1], 1: [2, 3, 4], 2: [5]}
    assert ds.txt2img == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1, 5: 2}
    assert len(ds) == 3
    assert set(ds[2]) == {"image", "index"} and ds[2]["index"] == 2


def test_eval_repeat_images_gives_one_row_per_caption(coco_like: Path) -> None:
    ds = MultiImgCapDataLoader(coco_like, ["annotations/test.json"], ["images"], stage="eval", repeat_images=True)
    assert len(ds) == 6
    row = ds[4]
    assert (row["caption"], row["index"], row["image_index"]) == ("b three", 4, 1)


def test_prompt_and_custom_text_transform(coco_like: Path) -> None:
    prompted = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"], prompt="a photo of ")
    assert prompted.captions[1] == "a photo of two dogs playing"
    upper = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"], text_transform=str.upper)
    assert upper.captions[1] == "TWO  DOGS (PLAYING)!"
    with pytest.raises(ValueError, match="prompt only applies"):
        MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"], text_transform=str.upper, prompt="x")


def test_missing_annotation_file_and_image_folder_are_named_in_one_error(coco_like: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        MultiImgCapDataLoader(coco_like, ["annotations/train.json", "coco/missing.json"], ["images", "coco/nowhere"])
    message = str(info.value)
    assert "2 data path(s) not found" in message
    assert str(coco_like / "coco" / "missing.json") in message
    assert str(coco_like / "coco" / "nowhere") in message


def test_mismatched_annotation_and_image_dir_counts_raise(coco_like: Path) -> None:
    with pytest.raises(ValueError, match="pair one-to-one, got 2 annotation files"):
        MultiImgCapDataLoader(coco_like, ["annotations/train.json", "annotations/test.json"], ["images"])


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"image": "val2014/a.jpg"}, "record 1 has no 'caption' key"),
        ({"caption": "x"}, "record 1 has no 'image' key"),
        ({"image": "val2014/a.jpg", "caption": []}, "record 1 needs 'image' as a string"),
    ],
)
def test_malformed_record_names_file_and_index(coco_like: Path, record: dict, match: str) -> None:
    _write_json(coco_like / "bad.json", [{"image": "val2014/a.jpg", "caption": "ok"}, record])
    with pytest.raises(ValueError, match=match) as info:
        MultiImgCapDataLoader(coco_like, ["bad.json"], ["images"])
    assert str(coco_like / "bad.json") in str(info.value)


def test_bad_jsonl_line_is_named(coco_like: Path) -> None:
    (coco_like / "bad.jsonl").write_text('{"image": "val2014/a.jpg", "caption": "ok"}\n{"image": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        MultiImgCapDataLoader(coco_like, ["bad.jsonl"], ["images"])


def test_corrupt_image_in_training_is_skipped_counted_and_logged(coco_like: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    bad = coco_like / "images" / "val2014" / "b.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"])
    with caplog.at_level(logging.WARNING, logger="blip2.data.captions"):
        items = [ds[i] for i in range(len(ds))]
    assert [item is None for item in items] == [False, True, False, False]
    assert ds.num_skipped == 1
    assert str(bad) in caplog.text


def test_corrupt_image_raises_with_on_error_raise(coco_like: Path) -> None:
    (coco_like / "images" / "val2014" / "b.jpg").write_bytes(b"not a jpeg")
    ds = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"], on_error="raise")
    with pytest.raises(ImageLoadError, match="b.jpg"):
        ds[1]
    evaluation = MultiImgCapDataLoader(coco_like, ["annotations/test.json"], ["images"], stage="eval")
    with pytest.raises(ImageLoadError, match="b.jpg"):  # evaluation raises by default
        evaluation[1]


def test_skips_in_dataloader_workers_reach_the_counter_and_the_batches(coco_like: Path) -> None:
    (coco_like / "images" / "val2014" / "a.jpg").unlink()
    (coco_like / "images" / "val2014" / "b.jpg").write_bytes(b"")
    ds = MultiImgCapDataLoader(coco_like, ["annotations/train.json"], ["images"])
    collate = ImageTextCollator(Blip2ImageProcessor(image_size=16), load_tokenizer(), max_length=8)
    batches = list(DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate))
    assert [b is None for b in batches] == [True, True, False, False]
    assert ds.num_skipped == 2


# --- classification -----------------------------------------------------------------------------------------------
def test_image_folder_classes_are_sorted_with_underscores_as_spaces(tmp_path: Path) -> None:
    _png(tmp_path / "sea_turtle" / "1.png")
    _png(tmp_path / "sea_turtle" / "0.jpg")
    _png(tmp_path / "apple" / "x.png", colour=(0, 255, 0))
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["apple", "sea turtle"]
    assert [label for _, label in ds.samples] == [0, 1, 1]
    item = ds[0]
    assert item["label"] == 0 and item["image"].getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere")


def _write_fake_cifar(root: Path) -> np.ndarray:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)  # (N, H, W, C)
    rows = images.transpose(0, 3, 1, 2).reshape(3, 3072)  # CIFAR rows: R plane, G plane, B plane
    for split in ("train", "test"):
        with (folder / split).open("wb") as f:
            pickle.dump({b"data": rows, b"fine_labels": [2, 0, 1], b"coarse_labels": [1, 1, 0]}, f)
    with (folder / "meta").open("wb") as f:
        pickle.dump({b"fine_label_names": [b"apple", b"maple_tree", b"sea"],
                     b"coarse_label_names": [b"fruit_and_vegetables", b"trees"]}, f)
    return images


def test_cifar100_pickle_round_trip(tmp_path: Path) -> None:
    images = _write_fake_cifar(tmp_path)
    ds = Cifar100Dataset(tmp_path, split="test")
    assert ds.classes == ["apple", "maple tree", "sea"]
    assert len(ds) == 3 and ds.labels == [2, 0, 1]
    item = ds[1]
    assert item["label"] == 0 and item["index"] == 1
    np.testing.assert_array_equal(np.asarray(item["image"]), images[1])
    coarse = Cifar100Dataset(tmp_path / "cifar-100-python", split="train", fine_label=False)
    assert coarse.classes == ["fruit and vegetables", "trees"] and coarse.labels == [1, 1, 0]


def test_cifar100_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/test, .*cifar-100-python/meta"):
        Cifar100Dataset(tmp_path)


# --- collation ----------------------------------------------------------------------------------------------------
def test_image_text_collator_shapes_and_dropping_none() -> None:
    image = Image.new("RGB", (20, 12), (10, 200, 30))
    items = [{"image": image, "caption": "a green box", "index": 4}, None,
             {"image": image, "caption": "two words here and more", "index": 7}]
    collate = ImageTextCollator(Blip2ImageProcessor(image_size=30), load_tokenizer(), max_length=32, train=True)
    batch = collate(items)
    assert batch["pixel_values"].shape == (2, 3, 30, 30)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
    assert batch["input_ids"][:, 0].tolist() == [101, 101]
    assert batch["attention_mask"].sum(1).tolist() == [5, 7]  # [CLS] words [SEP]
    assert batch["indices"].tolist() == [4, 7] and batch["num_skipped_in_batch"] == 1
    longest = ImageTextCollator(Blip2ImageProcessor(image_size=30), load_tokenizer(), padding="longest")(items)
    assert longest["input_ids"].shape == (2, 7)
    assert collate([None, None]) is None


def test_image_collator_with_and_without_labels() -> None:
    image = Image.new("RGB", (8, 8))
    collate = ImageCollator(Blip2ImageProcessor(image_size=14))
    batch = collate([{"image": image, "index": 0, "label": 3}, None, {"image": image, "index": 2, "label": 1}])
    assert batch["pixel_values"].shape == (2, 3, 14, 14)
    assert batch["labels"].tolist() == [3, 1] and batch["indices"].tolist() == [0, 2]
    assert "labels" not in collate([{"image": image, "index": 5}])
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])  # eval transform: deterministic


# --- shapes ---------------------------------------------------------------------------------------------------------
SMALL = {"num_train": 40, "num_test": 16, "images_per_class": 2}


def _all_pixels(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.png"))}


def test_shapes_same_seed_same_bytes_and_pixels_other_seed_differs(tmp_path: Path) -> None:
    first = generate_shapes_dataset(tmp_path / "a", seed=3, **SMALL)
    second = generate_shapes_dataset(tmp_path / "b", seed=3, **SMALL)
    other = generate_shapes_dataset(tmp_path / "c", seed=4, **SMALL)
    for name in (first.train_annotation, first.test_annotation, "dataset_info.json"):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes()
    assert (first.root / first.train_annotation).read_bytes() != (other.root / other.train_annotation).read_bytes()
    pixels_a, pixels_b, pixels_c = (_all_pixels(info.root) for info in (first, second, other))
    assert pixels_a.keys() == pixels_b.keys() == pixels_c.keys()
    assert len(pixels_a) == 40 + 16 + 16 * 2
    assert all(np.array_equal(pixels_a[k], pixels_b[k]) for k in pixels_a)
    assert sum(not np.array_equal(pixels_a[k], pixels_c[k]) for k in pixels_a) > 0.9 * len(pixels_a)


def test_shapes_layout_reads_back_through_the_data_sets(tmp_path: Path) -> None:
    info = generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    train = MultiImgCapDataLoader(info.root, [info.train_annotation], [info.image_dir])
    assert len(train) == 40 * 3 and train[0]["image"].size == (64, 64)
    test = MultiImgCapDataLoader(info.root, [info.test_annotation], [info.image_dir], stage="eval")
    assert len(test) == 16 and all(len(t) == 3 for t in test.img2txt.values())
    classes = ImageFolderDataset(info.root / info.classes_dir)
    assert len(classes.classes) >= 8 and classes.classes == info.classes
    assert "red circle" in classes.classes and len(classes) == 2 * len(classes.classes)
    saved = json.loads((info.root / "dataset_info.json").read_text())
    assert saved["classes"] == info.classes and saved["seed"] == 0


def test_shapes_class_images_come_from_their_own_random_stream(tmp_path: Path) -> None:
    info = generate_shapes_dataset(tmp_path, seed=0, **SMALL)
    train = {p.read_bytes() for p in (info.root / info.image_dir).rglob("*.png")}
    held_out = {p.read_bytes() for p in (info.root / info.classes_dir).rglob("*.png")}
    assert not train & held_out


def test_shapes_captions_name_the_colour_and_shape_of_their_image(tmp_path: Path) -> None:
    info = generate_shapes_dataset(tmp_path, seed=1, num_train=64, num_test=16, images_per_class=1)
    train = json.loads((info.root / info.train_annotation).read_text())
    test = json.loads((info.root / info.test_annotation).read_text())
    pairs = [(r["caption"], r) for r in train] + [(c, r) for r in test for c in r["caption"]]
    assert all(shapes_caption_fields(c) == (r["colour"], r["shape"]) for c, r in pairs)
    assert len({c for c, _ in pairs}) > len(pairs) // 2  # varied templates, not one sentence per class
    assert len({r["image"] for r in train}) == 64 and len(train) == 64 * 3
    # the pixels agree with the annotation: the shape's colour is the dominant saturated colour
    first = np.asarray(Image.open(info.root / info.image_dir / train[0]["image"])).reshape(-1, 3).astype(int)
    saturated = first[first.max(1) - first.min(1) > 100]
    channel = {"red": 0, "green": 1, "blue": 2}.get(train[0]["colour"])
    if channel is not None:
        assert np.bincount(saturated.argmax(1), minlength=3).argmax() == channel
    else:  # yellow: red and green both high
        assert (saturated[:, :2].min(1) > 150).all() and (saturated[:, 2] < 120).all()


def test_shapes_caption_fields() -> None:
    assert shapes_caption_fields("A small RED circle in the top left.") == ("red", "circle")
    assert shapes_caption_fields("two blue crosses and squares") == ("blue", "cross")
    assert shapes_caption_fields("a picture of something") == (None, None)
    assert shapes_caption_fields("a green thing") == ("green", None)


def test_shapes_refuses_a_foreign_non_empty_folder_and_regenerates_its_own(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_shapes_dataset(tmp_path, **SMALL)
    own = tmp_path / "shapes"
    generate_shapes_dataset(own, num_train=40, num_test=16, images_per_class=3)
    generate_shapes_dataset(own, **SMALL)
    assert len(list((own / "classes" / "red_circle").iterdir())) == 2  # stale images of the first run are gone
