"""The loader's promises: strict loads that name keys and shapes, presets that say where their files go, an exact
native round trip, and ``blip2 convert`` (in-process) with one-line errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2 import Blip2Config, Blip2Qformer
from blip2.config import QformerConfig, ViTConfig
from blip2.weights import WeightLoadError
from blip2.cli.convert import main as convert
from blip2.weights.lavis import to_lavis
from weights_fixtures import save_torch, saved_stage1


def tiny_config() -> Blip2Config:
    vision = ViTConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    qformer = QformerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                            query_length=5, vocab_size=99, max_position_embeddings=20, bos_token_id=98,
                            sep_token_id=97)
    return Blip2Config(vision_config=vision, qformer_config=qformer, embed_dim=16, max_txt_len=20)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """(model, its saved folder)."""
    return saved_stage1(tiny_config(), tmp_path_factory, "native")


def _edited_copy(folder, target, edit):
    target.mkdir()
    (target / "config.yaml").write_text((folder / "config.yaml").read_text())
    save_file(edit(load_file(str(folder / "model.safetensors"))), str(target / "model.safetensors"))
    return target


def test_native_round_trip_is_exact(native):
    model, folder = native
    loaded = Blip2Qformer.from_pretrained(folder)
    assert loaded.config == model.config
    assert list(loaded.state_dict()) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []


def test_wrong_shape_names_the_key_and_both_shapes(native, tmp_path):
    def widen(state):
        state["itm_head.weight"] = torch.zeros(3, 32)
        return state

    folder = _edited_copy(native[1], tmp_path / "wide", widen)
    with pytest.raises(WeightLoadError, match=r"itm_head\.weight: checkpoint \(3, 32\) vs model \(2, 32\)"):
        Blip2Qformer.from_pretrained(folder)


def test_missing_and_unexpected_keys_are_named(native, tmp_path):
    def damage(state):
        del state["qformer.layers.1.query_ffn.output.norm.bias"]
        state["surprise.weight"] = torch.zeros(1)
        return state

    folder = _edited_copy(native[1], tmp_path / "damaged", damage)
    with pytest.raises(WeightLoadError) as error:
        Blip2Qformer.from_pretrained(folder)
    assert "1 missing keys: qformer.layers.1.query_ffn.output.norm.bias" in str(error.value)
    assert "1 unexpected keys: surprise.weight" in str(error.value)


def test_preset_without_files_says_what_to_place_where(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        Blip2Qformer.from_pretrained("blip2_stage1_vit_g")
    message = str(error.value)
    assert str(tmp_path / "blip2_stage1_vit_g") in message
    assert "config.yaml" in message and "model.safetensors" in message
    assert "blip2 convert --from lavis" in message and "--config blip2_stage1_vit_g" in message


def test_an_eva_file_alone_is_not_mistaken_for_a_model(tmp_path):
    path = save_torch({"cls_token": torch.zeros(1, 1, 36), "blocks.0.attn.qkv.weight": torch.zeros(108, 36)},
                      tmp_path / "eva_vit_g.pth")
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint format.*vit_checkpoint="):
        Blip2Qformer.from_pretrained(path)


@pytest.fixture(scope="module")
def lavis_files(native, tmp_path_factory):
    """A LAVIS checkpoint without the ViT, the EVA file holding it, and the config as YAML."""
    model, _ = native
    folder = tmp_path_factory.mktemp("lavis_cli")
    lavis_state = to_lavis(model.state_dict(), model.config)
    trainable = {key: value for key, value in lavis_state.items() if not key.startswith("visual_encoder.")}
    eva = {key.removeprefix("visual_encoder."): value for key, value in lavis_state.items()
           if key.startswith("visual_encoder.")}
    model.config.to_yaml(folder / "tiny.yaml")
    return (save_torch({"model": trainable}, folder / "blip2.pth"), save_torch(eva, folder / "eva_vit_g.pth"),
            folder / "tiny.yaml")


def test_convert_lavis_writes_a_loadable_folder(native, lavis_files, tmp_path, capsys):
    checkpoint, eva, config = lavis_files
    code = convert(["--from", "lavis", "--input", str(checkpoint), "--vit", str(eva), "--config", str(config),
                    "--output", str(tmp_path / "converted")])
    assert code == 0, capsys.readouterr().err
    converted = Blip2Qformer.from_pretrained(tmp_path / "converted")
    for key, value in native[0].state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_convert_missing_input_is_one_clear_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.pth"
    code = convert(["--from", "lavis", "--input", str(missing), "--config", "blip2_tiny", "--output", str(tmp_path)])
    assert code == 2
    assert f"--input {missing} does not exist" in _error_line(capsys)


def test_convert_lavis_without_config_asks_for_it(lavis_files, tmp_path, capsys):
    code = convert(["--from", "lavis", "--input", str(lavis_files[0]), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "--from lavis needs --config" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_convert_lavis_without_vit_names_the_missing_keys(lavis_files, tmp_path, capsys):
    checkpoint, _, config = lavis_files
    code = convert(["--from", "lavis", "--input", str(checkpoint), "--config", str(config),
                    "--output", str(tmp_path / "out")])
    assert code == 2
    line = _error_line(capsys)
    assert "visual_encoder" in line and "--vit" in line


def test_convert_wrong_format_is_named(lavis_files, tmp_path, capsys):
    code = convert(["--from", "hf", "--input", str(lavis_files[0]), "--output", str(tmp_path / "out")])
    assert code == 2
    assert "is not a Hugging Face BLIP-2 folder" in _error_line(capsys)
