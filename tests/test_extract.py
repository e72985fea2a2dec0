"""Feature extraction (``blip2 extract`` / ``blip2.engine.extract``): sharded over processes, resumable, bad images
skipped and named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2 import Blip2Qformer
from blip2.cli.main import main
from blip2.engine.extract import MANIFEST, extract_features, list_images, load_features, shard_names
from tests.test_distributed import free_port


def image_folder(root: Path, count: int = 7) -> Path:
    """``count`` small images in nested folders, a corrupt ``.jpg`` and a text file that is not an image."""
    rng = np.random.default_rng(0)
    for index in range(count):
        folder = root / ("a" if index % 2 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20 + index, 24, 3), dtype=np.uint8)).save(folder / f"img{index}.png")
    (root / "a" / "broken.jpg").write_bytes(b"not really a jpeg")
    (root / "notes.txt").write_text("skip me")
    return root


def tiny_model() -> Blip2Qformer:
    torch.manual_seed(0)
    return Blip2Qformer.from_pretrained("blip2_tiny").eval()


def test_two_processes_give_the_features_of_one(tmp_path):
    images = image_folder(tmp_path / "images")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    args = ["extract", "--images", str(images), "--model", "blip2_tiny", "--batch_size", "2", "--shard_size", "3",
            "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "blip2", *args, "--output", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    warnings = [line for line in single.stderr.splitlines() if "unreadable" in line]
    assert warnings == ["blip2: warning: skipped 1 unreadable images: a/broken.jpg"]
    sharded = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              str(free_port()), "-m", "blip2", *args, "--output", str(tmp_path / "two")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one, two = load_features(tmp_path / "one"), load_features(tmp_path / "two")
    assert len(one) == 7 and sorted(one) == sorted(two)  # 8 image files, one unreadable
    for image_id, feats in one.items():
        assert feats.shape == two[image_id].shape and feats.shape[0] > 1  # (Q, E)
        torch.testing.assert_close(two[image_id], feats, atol=1e-5, rtol=0)
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(feats.shape[0]))  # normalized ITC features
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["num_shards"] == 3 and manifest["unreadable"] == ["a/broken.jpg"]
    assert [entry["count"] for entry in manifest["shards"]] == [2, 3, 2]


class Killed(Exception):
    pass


def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    paths = list_images(image_folder(tmp_path / "images"))
    model = tiny_model()

    def kill_after_first(shard):
        raise Killed(shard)

    with pytest.raises(Killed):
        extract_features(model, paths, tmp_path / "out", batch_size=2, shard_size=3, progress=False,
                         on_shard_written=kill_after_first)
    first = tmp_path / "out" / shard_names(0)[0]
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [entry["shard"] for entry in manifest["shards"]] == [0] and not manifest["complete"]
    assert not (tmp_path / "out" / shard_names(1)[0]).exists()
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp")]
    stamp = first.stat().st_mtime_ns
    written = []
    result = extract_features(model, paths, tmp_path / "out", batch_size=2, shard_size=3, progress=False,
                              on_shard_written=written.append)
    assert written == result.written == [1, 2] and result.reused == [0]
    assert first.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["complete"]
    again = extract_features(model, paths, tmp_path / "out", batch_size=2, shard_size=3, progress=False)
    assert again.written == [] and again.reused == [0, 1, 2]  # a finished run does nothing
    fresh = extract_features(model, paths, tmp_path / "fresh", batch_size=2, shard_size=3, progress=False)
    assert fresh.written == [0, 1, 2]
    resumed, uninterrupted = load_features(tmp_path / "out"), load_features(tmp_path / "fresh")
    assert sorted(resumed) == sorted(uninterrupted) and len(resumed) == 7
    for image_id, feats in uninterrupted.items():
        assert torch.equal(resumed[image_id], feats)
    with pytest.raises(ValueError, match="other images"):  # other shard boundaries: not mixed into this output
        extract_features(model, paths, tmp_path / "out", batch_size=2, shard_size=4, progress=False)


@pytest.mark.parametrize("make, expected", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "no images"),
])
def test_cli_reports_a_bad_image_folder_in_one_line(tmp_path, capsys, make, expected):
    folder = make(tmp_path)
    status = main(["extract", "--images", str(folder), "--model", "blip2_tiny", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("blip2: error: ") and expected in err
    assert not (tmp_path / "out").exists()
