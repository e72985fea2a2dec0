"""Issue 10: files from users run no code and fail as one line naming the file (items 2, 12 and 13).

Each test name says the item it covers: 2 CIFAR-100 pickles, 12 decompression bombs, 13a invalid YAML, 13b lists
and other non-numbers for number fields, 13c unreadable checkpoints, 13d annotation files that are not UTF-8.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from blip2 import Blip2Config, Blip2Qformer
from blip2.config import ConfigError, coerce_number, set_by_path
from blip2.data import Cifar100Dataset, MultiImgCapDataLoader
from blip2.data.captions import read_annotations
from blip2.engine.run_config import DatasetConfig, RunConfig, RunnerConfig
from blip2.processing import ImageLoadError
from blip2.processing.image import load_image
from blip2.weights import WeightLoadError, read_state_dict
from tests.helpers import tiny_config


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# --- item 2: CIFAR-100 pickles ------------------------------------------------------------------------------------
class _Payload:
    """Unpickling it calls ``function(*args)``: what a crafted CIFAR file would make ``pickle.load`` run."""

    def __init__(self, function, *args) -> None:
        self.call = (function, args)

    def __reduce__(self):
        return self.call


def _cifar_folder(root: Path, split_object, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "test").write_bytes(pickle.dumps(split_object, protocol=protocol))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"maple_tree"],
                                                b"coarse_label_names": [b"trees"]}, protocol=protocol))
    return folder


def _cifar_split(count: int = 2) -> tuple[dict, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(count, 3072)  # CIFAR rows: R, G, B planes
    split = {b"data": rows, b"fine_labels": [1, 0][:count], b"coarse_labels": [0] * count,
             b"filenames": [f"img_{i}.png".encode() for i in range(count)], b"batch_label": b"testing batch 1 of 1"}
    return split, images


@pytest.mark.parametrize("call", ["open", "exec"])
def test_item02_cifar_pickle_cannot_run_code(tmp_path: Path, call: str) -> None:
    marker = tmp_path / "marker"
    payload = (_Payload(open, str(marker), "w") if call == "open"
               else _Payload(exec, f"open({str(marker)!r}, 'w').close()"))
    folder = _cifar_folder(tmp_path, {b"data": payload, b"fine_labels": [0]})
    refused = r"io\.open" if call == "open" else r"builtins\.exec"  # open pickles as io.open
    with pytest.raises(ValueError, match=rf"refuses to load {refused}: CIFAR-100 files hold only arrays") as info:
        Cifar100Dataset(tmp_path)
    assert str(folder / "test") in _one_line(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
def test_item02_cifar_format_pickles_still_load(tmp_path: Path, protocol: int) -> None:
    split, images = _cifar_split()
    _cifar_folder(tmp_path, split, protocol)
    ds = Cifar100Dataset(tmp_path, split="test")
    assert ds.classes == ["apple", "maple tree"] and ds.labels == [1, 0]
    np.testing.assert_array_equal(np.asarray(ds[1]["image"]), images[1])


def test_item02_cifar_pickle_naming_numpy1_modules_loads(tmp_path: Path) -> None:
    """The real files were written by numpy 1 (``numpy.core.multiarray._reconstruct``), under Python 2."""
    split, images = _cifar_split()
    folder = _cifar_folder(tmp_path, split, protocol=2)
    data = (folder / "test").read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in data  # protocol 2 names globals as text lines
    (folder / "test").write_bytes(data.replace(b"numpy._core.", b"numpy.core."))
    np.testing.assert_array_equal(np.asarray(Cifar100Dataset(tmp_path)[0]["image"]), images[0])


def test_item02_truncated_cifar_file_is_one_line_naming_it(tmp_path: Path) -> None:
    split, _ = _cifar_split()
    folder = _cifar_folder(tmp_path, split)
    (folder / "test").write_bytes((folder / "test").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a CIFAR-100 python file") as info:
        Cifar100Dataset(tmp_path)
    assert str(folder / "test") in _one_line(info.value)


# --- item 12: decompression bombs ---------------------------------------------------------------------------------
@pytest.fixture
def small_pixel_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL raises DecompressionBombError above 2x: 2000 pixels


def test_item12_decompression_bomb_is_an_image_load_error(tmp_path: Path, small_pixel_limit) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(big)  # 10000 pixels
    with pytest.raises(ImageLoadError, match=r"too large \(decompression bomb limit\)") as info:
        load_image(big)
    assert str(big) in _one_line(info.value)


def test_item12_decompression_bomb_is_skipped_in_training(tmp_path: Path, small_pixel_limit) -> None:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "images" / "small.png")
    Image.new("RGB", (100, 100), (9, 9, 9)).save(tmp_path / "images" / "big.png")
    records = [{"image": "small.png", "caption": "a small one"}, {"image": "big.png", "caption": "a big one"}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    ds = MultiImgCapDataLoader(tmp_path, ["train.json"], ["images"], on_error="skip")
    assert [ds[i] is None for i in range(len(ds))] == [False, True]
    assert ds.num_skipped == 1


# --- item 13a: invalid YAML ---------------------------------------------------------------------------------------
def test_item13a_invalid_yaml_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("embed_dim: 16\nmax_txt_len: [1, 2\nfreeze_vision: true\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line \d+, column \d+: ") as info:
        Blip2Config.from_yaml(path)
    assert str(path) in _one_line(info.value)
    path.write_text("run_mode: train\n  output_dir: x\n")  # bad indentation
    with pytest.raises(ConfigError, match=r"invalid YAML at line 2, column \d+") as info:
        RunConfig.from_yaml(path)
    _one_line(info.value)


def test_item13a_non_utf8_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("embed_dim: 16 # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text") as info:
        Blip2Config.from_yaml(path)
    _one_line(info.value)


# --- item 13b: lists, dicts and bools for number fields -----------------------------------------------------------
@pytest.mark.parametrize("value, kind", [([1, 2], "a list"), ({"a": 1}, "a mapping"), (True, "a boolean")])
def test_item13b_non_number_for_a_number_field_names_the_key(value, kind: str) -> None:
    with pytest.raises(ConfigError, match=rf"runner_config\.batch_size=.* is {kind}: expected an integer") as info:
        RunConfig.from_dict({"runner_config": {"batch_size": value}})
    _one_line(info.value)
    with pytest.raises(ConfigError, match=rf"lr_schedule\.learning_rate=.* is {kind}: expected a number"):
        RunConfig.from_dict({"lr_schedule": {"learning_rate": value}})


def test_item13b_set_override_with_a_list_for_a_number_names_the_key() -> None:
    config = RunConfig()
    with pytest.raises(ConfigError, match=r"lr_schedule\.learning_rate=\[1\] is a list"):
        set_by_path(config, "lr_schedule.learning_rate", "[1]")
    with pytest.raises(ConfigError, match=r"runner_config\.batch_size=1\.5 is not an integer"):
        set_by_path(config, "runner_config.batch_size", "1.5")
    set_by_path(config, "lr_schedule.learning_rate", "3e-4")
    assert config.lr_schedule.learning_rate == 3e-4


def test_item13b_fields_defaulting_to_none_still_take_none_but_not_lists() -> None:
    # max_grad_norm: float | None = None and batch_size: int | None = None: the annotation says which number
    assert RunnerConfig.from_dict({"max_grad_norm": None}).max_grad_norm is None
    assert RunnerConfig.from_dict({"max_grad_norm": "1e0"}).max_grad_norm == 1.0
    with pytest.raises(ConfigError, match=r"max_grad_norm=\[1\] is a list: expected a number"):
        RunnerConfig.from_dict({"max_grad_norm": [1]})
    with pytest.raises(ConfigError, match=r"eval_dataset\.batch_size=\[1, 2\] is a list: expected an integer"):
        RunConfig.from_dict({"eval_dataset": {"batch_size": [1, 2]}})
    assert DatasetConfig.from_dict({"batch_size": None}).batch_size is None
    config = RunConfig()
    set_by_path(config, "runner_config.max_grad_norm", "2")
    set_by_path(config, "runner_config.max_grad_norm", "null")  # back to None: the annotation allows it
    assert config.runner_config.max_grad_norm is None
    with pytest.raises(ConfigError, match=r"runner_config\.eval_batch_size=\[4\] is a list"):
        set_by_path(config, "runner_config.eval_batch_size", "[4]")


def test_item13b_ints_take_integral_values_only() -> None:
    assert coerce_number("k", 2.0, 1) == 2 and coerce_number("k", "1e3", 1) == 1000 and coerce_number("k", "7", 1) == 7
    assert isinstance(coerce_number("k", 2, 0.5), float)
    for bad in (1.5, "1.5", "nan", "two"):
        with pytest.raises(ConfigError, match="k=.* is not an integer"):
            coerce_number("k", bad, 1)
    with pytest.raises(ConfigError, match="k is null: expected an integer"):
        coerce_number("k", None, 1, "int")
    assert coerce_number("k", [1], True) == [1]  # bool fields are not numbers: left to their own checks


# --- item 13c: unreadable checkpoints -----------------------------------------------------------------------------
def test_item13c_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(WeightLoadError, match="truncated or not a safetensors file") as info:
        read_state_dict(path)
    assert str(path) in _one_line(info.value)


def test_item13c_truncated_weights_in_our_folder_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    Blip2Qformer(tiny_config()).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightLoadError, match=rf"{weights}: truncated or not a safetensors file"):
        Blip2Qformer.from_pretrained(folder)


@pytest.mark.parametrize("content", ["truncated", "empty", "junk"])
def test_item13c_unreadable_pth_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "blip2.pth"
    torch.save({"model": {"a": torch.zeros(64)}}, path)
    data = {"truncated": path.read_bytes()[:200], "empty": b"", "junk": b"not a checkpoint at all"}[content]
    path.write_bytes(data)
    with pytest.raises(WeightLoadError, match="blip2.pth") as info:
        read_state_dict(path)
    assert str(path) in _one_line(info.value)


def test_item13c_pth_holding_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"a": torch.zeros(2)}, "hook": _Payload(open, str(marker), "w")}, path)
    with pytest.raises(WeightLoadError, match=r"evil\.pth holds objects beyond tensors \(io\.open\): "
                       "refusing to unpickle them") as info:
        read_state_dict(path)
    _one_line(info.value)
    assert not marker.exists()


# --- item 13d: annotation files that are not UTF-8 ----------------------------------------------------------------
def test_item13d_non_utf8_annotation_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_bytes('[{"image": "a.png", "caption": "un caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"train\.json: not UTF-8 text") as info:
        read_annotations(path)
    assert str(path) in _one_line(info.value)
    with pytest.raises(ValueError, match="not UTF-8 text"):
        MultiImgCapDataLoader(tmp_path, ["train.json"], ["."])
