"""Issue 12: webdataset tar shards. ``blip2 shard`` writes them from LAVIS annotations or a captioned image folder; the
streaming reader gives every pair once per epoch over ranks x workers, resumes at the right sample, and counts
corrupt members; the Trainer trains on them and resumes exactly."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2.cli import main
from blip2.config import ConfigError
from blip2.data import MultiImgCapDataLoader
from blip2.data.shards import (MANIFEST, ShardedCaptions, annotation_images, consumed_per_worker, folder_images,
                               write_shards)
from blip2.engine.run_config import RunConfig
from blip2.engine.trainer import Trainer
from blip2.models import Blip2Qformer
from blip2.processing.image import ImageLoadError
from tests.helpers import run_config, shapes_data

TRAIN = (["annotations/train.json"], ["images"])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return shapes_data(tmp_path_factory.mktemp("shapes"), num_train=16, num_test=4)  # 16 images, 32 pairs


@pytest.fixture(scope="module")
def shards(shapes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(annotation_images(shapes.root, *TRAIN), out, shard_size=2)  # 8 tars of 2 images, 4 pairs each
    return out


def as_items(batch):
    return list(batch)


def read_rank(shard_dir, rank: int, world: int = 2, epoch: int = 0, skip: int = 0, batch_size: int = 3,
              drop_last: bool = False, num_workers: int = 2, **options):
    dataset = ShardedCaptions([shard_dir], rank=rank, world_size=world, shuffle_buffer=5, seed=7, **options)
    dataset.set_epoch(epoch, skip, batch_size, drop_last)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=as_items,
                        drop_last=drop_last)
    return loader, dataset


def pair_key(image: Image.Image, caption: str) -> tuple[bytes, str]:
    return np.asarray(image).tobytes(), caption


def test_shards_give_every_pair_exactly_once_per_epoch_over_2_ranks_x_2_workers(shapes, shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert [s["name"] for s in manifest["shards"]][:2] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["num_samples"] == 16 and manifest["num_pairs"] == 32 and len(manifest["shards"]) == 8
    with tarfile.open(shards / "shard-000001.tar") as tar:  # zero-padded keys, image + txt + json per sample
        assert tar.getnames() == [f"00000000{k}.{ext}" for k in (2, 3) for ext in ("json", "png", "txt")]
    reference = MultiImgCapDataLoader(shapes.root, *TRAIN)
    expected = Counter(pair_key(item["image"], item["caption"]) for item in (reference[i] for i in
                                                                           range(len(reference))))
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader, dataset = read_rank(shards, rank, epoch=epoch)
            assert dataset.num_skipped == 0
            seen += [item for batch in loader for item in batch]
        assert Counter(pair_key(item["image"], item["caption"]) for item in seen) == expected
        assert sorted(item["index"] for item in seen) == list(range(32))
        orders.append([item["index"] for item in seen])
    assert orders[0] != orders[1], "each epoch shuffles anew"


def test_resume_after_n_batches_continues_with_the_same_samples(shards):
    def indices(loader, limit=None):
        return [[item["index"] for item in batch] for batch in islice(loader, limit)]

    full = indices(read_rank(shards, rank=1, drop_last=True)[0])
    assert len(full) == 4  # 16 pairs on this rank, 8 per worker: 2 full batches of 3 each
    for done in (1, 3):
        assert indices(read_rank(shards, rank=1, skip=done, drop_last=True)[0]) == full[done:]


def test_a_resampled_weighted_mix_resumes_too(shards, tmp_path, shapes):
    other = tmp_path / "other"
    write_shards(annotation_images(shapes.root, *TRAIN)[:4], other, shard_size=1)

    def indices(skip, limit):
        dataset = ShardedCaptions([shards, other], weights=[1, 3], rank=0, world_size=2, seed=3, shuffle_buffer=4)
        dataset.set_epoch(0, skip, 2, True)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=as_items, drop_last=True)
        return [[item["index"] for item in batch] for batch in islice(loader, limit)]

    full = indices(0, 8)
    assert indices(3, 5) == full[3:]
    flat = [i for batch in full for i in batch]
    assert any(i >= 32 for i in flat) and any(i < 32 for i in flat)  # both sets (the second's pairs follow)
    assert len(ShardedCaptions([shards, other])) == 32 + 8


def test_consumed_per_worker_follows_the_dataloaders_turns():
    assert consumed_per_worker([5, 3], 0) == ([0, 0], 0)
    assert consumed_per_worker([5, 3], 3) == ([2, 1], 1)
    assert consumed_per_worker([5, 3], 7) == ([4, 3], 1)  # worker 1 has run out: worker 0 gives on alone
    assert consumed_per_worker([5, 3], 8) == ([5, 3], 1)
    assert consumed_per_worker([float("inf")] * 3, 4) == ([2, 1, 1], 1)


def corrupt_members(tar_path: Path, replacements: dict[str, bytes]) -> None:
    """Rewrite a tar with some members' contents replaced (garbage or a truncated image)."""
    with tarfile.open(tar_path) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for info, data in members:
            data = replacements.get(info.name, data)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_members_are_skipped_and_counted(shards, tmp_path):
    import shutil

    copy = tmp_path / "corrupt"
    shutil.copytree(shards, copy)
    with tarfile.open(copy / "shard-000000.tar") as tar:
        png = tar.extractfile("000000001.png").read()
    corrupt_members(copy / "shard-000000.tar", {"000000000.png": b"not an image at all",
                                                "000000001.png": png[: len(png) // 2]})  # truncated
    items = []
    for rank in (0, 1):
        loader, dataset = read_rank(copy, rank, num_workers=2)
        items += [item for batch in loader for item in batch]
        if rank == 0:
            skipped = dataset.num_skipped
        else:
            skipped += dataset.num_skipped
    assert len(items) == 32 and sum(item is None for item in items) == 4  # 2 images x 2 captions each
    assert skipped == 4
    with pytest.raises(ImageLoadError, match="cannot decode .*shard-000000.tar"):
        for rank in (0, 1):
            list(read_rank(copy, rank, num_workers=0, on_error="raise")[0])


def test_cli_writes_shards_from_lavis_json_and_from_a_folder(shapes, tmp_path, capsys):
    out = tmp_path / "from_json"
    argv = ["shard", "--dataset_dir", str(shapes.root), "--annotation_files", *TRAIN[0], "--image_dirs", *TRAIN[1],
            "--output", str(out), "--shard_size", "5", "--resize", "16"]
    assert main(argv) == 0
    assert "wrote 4 shards" in capsys.readouterr().out
    manifest = json.loads((out / MANIFEST).read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 5, 1] and manifest["resize"] == 16
    with tarfile.open(out / "shard-000003.tar") as tar:
        image = Image.open(io.BytesIO(tar.extractfile("000000015.jpg").read()))
        assert image.format == "JPEG" and min(image.size) == 16
    assert main(argv) == 2  # the folder holds shards: refused in one line
    assert capsys.readouterr().err.strip().count("\n") == 0

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        Image.new("RGB", (20, 12), colour).save(folder / f"{name}.jpg")
    (folder / "a.txt").write_text("A red picture.\n\nstill red\n")
    (folder / "b.txt").write_text("green")  # c.jpg has no caption: left out
    assert main(["shard", "--image_folder", str(folder), "--output", str(tmp_path / "from_folder")]) == 0
    dataset = ShardedCaptions([tmp_path / "from_folder"], shuffle=False)
    assert sorted(item["caption"] for item in dataset) == ["a red picture", "green", "still red"]
    assert folder_images(folder)[0][0].name == "a.jpg"


def test_a_shard_config_is_checked(tmp_path):
    loader = {"type": "WebDataset", "shards": ["a", "b"], "weights": [1.0]}
    with pytest.raises(ConfigError, match=r"data_loader.weights=\[1.0\] must be one positive number per shard set"):
        RunConfig.from_dict({"train_dataset": {"data_loader": loader}})
    with pytest.raises(ConfigError, match="read only by type WebDataset"):
        RunConfig.from_dict({"train_dataset": {"data_loader": {"shards": ["a"]}}})
    with pytest.raises(ConfigError, match="unknown config key 'train_dataset.data_loader.shard'"):
        RunConfig.from_dict({"train_dataset": {"data_loader": {"type": "WebDataset", "shard": ["a"]}}})


def train_on_shards(shard_dir: Path, output_dir: Path, max_steps: int, resume: bool = False) -> Trainer:
    torch.manual_seed(0)
    config = run_config(shard_dir, output_dir, max_steps=max_steps, batch_size=4, num_workers=2, save_steps=3)
    config["train_dataset"]["data_loader"] = {"type": "WebDataset", "dataset_dir": str(shard_dir.parent),
                                              "shards": [shard_dir.name], "shuffle_buffer": 6}
    config["eval_dataset"] = None
    config["lr_schedule"]["total_steps"] = 8
    trainer = Trainer(task="contrastive_language_image_pretrain", model=Blip2Qformer.from_pretrained("blip2_tiny"),
                      config=config)
    trainer.train(resume=resume)
    return trainer


def test_training_on_shards_resumes_like_an_uninterrupted_run(shards, tmp_path):
    # 32 pairs, 1 process, 2 workers x 4 tars each, batches of 4: 8 batches per epoch; stop mid-epoch 0 at step 3
    straight = train_on_shards(shards, tmp_path / "straight", 10)
    assert straight.global_step == 10
    log = [json.loads(line) for line in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [0, 1] and log[-1]["skipped_images"] == 0
    train_on_shards(shards, tmp_path / "split", 3)
    resumed = train_on_shards(shards, tmp_path / "split", 10, resume=True)
    assert resumed.global_step == 10
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"{name} differs after resume")


def test_shards_are_for_training_only(shards):
    from blip2.engine.build import build_dataset
    from blip2.engine.run_config import DatasetConfig

    cfg = DatasetConfig.from_dict({"data_loader": {"type": "WebDataset", "shards": [str(shards)]}})
    assert isinstance(build_dataset(cfg, train=True), ShardedCaptions)
    with pytest.raises(ValueError, match="streams training data"):
        build_dataset(cfg, train=False)
