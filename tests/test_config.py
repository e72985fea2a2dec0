"""Configs: YAML round trip, errors that name the bad key, presets."""

from __future__ import annotations

import pytest

from blip2 import Blip2Config, Blip2Qformer
from blip2.config import ConfigError, QformerConfig, ViTConfig, set_by_path


def test_yaml_round_trip_keeps_every_field(tmp_path):
    config = Blip2Config(vision_config=ViTConfig(image_size=28, patch_size=7, hidden_size=16, num_attention_heads=2),
                         qformer_config=QformerConfig(query_length=4), embed_dim=8, prompt="a photo of")
    config.to_yaml(tmp_path / "c.yaml")
    loaded = Blip2Config.from_yaml(tmp_path / "c.yaml")
    assert loaded == config
    assert loaded.vision_config.num_patches == 16


def test_unknown_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"qformer_config\.query_lenght.*valid keys: hidden_size"):
        Blip2Config.from_dict({"qformer_config": {"query_lenght": 4}})
    with pytest.raises(ConfigError, match="'embedding_dim'"):
        Blip2Config.from_dict({"embedding_dim": 4})


def test_seed_type_keys_are_accepted_and_checked():
    config = Blip2Config.from_dict({"type": "Blip2Config", "vision_config": {"type": "ViTConfig", "image_size": 28,
                                                                           "patch_size": 14}})
    assert config.vision_config.image_size == 28
    with pytest.raises(ConfigError, match="does not match"):
        Blip2Config.from_dict({"type": "LlamaConfig"})


@pytest.mark.parametrize("bad, message", [
    ({"vision_config": {"hidden_size": 30, "num_attention_heads": 4}}, r"num_attention_heads=4 must divide"),
    ({"vision_config": {"image_size": 100, "patch_size": 14}}, r"patch_size=14 must divide"),
    ({"qformer_config": {"vocab_size": 100}}, r"bos_token_id=30522 is outside"),
    ({"compute_dtype": "float64"}, r"compute_dtype"),
    ({"max_txt_len": 1000}, r"max_position_embeddings"),
])
def test_invalid_values_are_named(bad, message):
    with pytest.raises(ConfigError, match=message):
        Blip2Config.from_dict(bad)


def test_set_by_path_overrides_existing_keys_only():
    config = Blip2Config()
    set_by_path(config, "qformer_config.query_length", "16")
    set_by_path(config, "vision_config.layer_norm_eps", "1")
    assert config.qformer_config.query_length == 16 and config.vision_config.layer_norm_eps == 1.0
    with pytest.raises(ConfigError, match=r"qformer_config\.querys.*valid keys here"):
        set_by_path(config, "qformer_config.querys", "3")


def test_support_list_prints_and_returns_the_presets(capsys):
    names = Blip2Qformer.show_support_list()
    assert {"blip2_stage1_vit_g", "blip2_stage1_classification", "blip2_stage1_evaluator", "blip2_tiny"} <= set(names)
    assert "blip2_stage1_vit_g" in capsys.readouterr().out


def test_vit_g_preset_has_the_published_shapes():
    config = Blip2Config.from_pretrained("blip2_stage1_vit_g")
    vision, qformer = config.vision_config, config.qformer_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (224, 14, 1408, 39)
    assert (vision.intermediate_size, vision.num_attention_heads) == (6144, 16)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.query_length, qformer.vocab_size) == (768, 12, 32,
                                                                                                          30523)
    assert config.embed_dim == 256 and qformer.bos_token_id == 30522


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="presets: blip2_stage1_vit_g"):
        Blip2Qformer.from_pretrained("blip2_stage1_vit_h")


def test_yaml_numbers_written_as_strings_become_numbers_or_are_named():
    from blip2.engine.run_config import RunConfig

    config = RunConfig.from_dict({"lr_schedule": {"learning_rate": "1e-4", "warmup_steps": "5"}})
    assert config.lr_schedule.learning_rate == 1e-4 and config.lr_schedule.warmup_steps == 5
    set_by_path(config, "lr_schedule.learning_rate", "2e-3")
    assert config.lr_schedule.learning_rate == 2e-3
    with pytest.raises(ConfigError, match=r"lr_schedule\.learning_rate='fast' is not a number"):
        set_by_path(config, "lr_schedule.learning_rate", "fast")


def test_every_shipped_run_config_loads_and_stage2_ones_fit_their_sequence():
    from pathlib import Path

    from blip2.engine.run_config import RunConfig

    files = sorted((Path(__file__).resolve().parents[1] / "configs" / "blip2").glob("*.yaml"))
    names = {f.name for f in files}
    assert {"run_blip2_stage2_vit_g_llama_7b.yaml", "run_blip2_stage2_vit_g_baichuan_7b.yaml",
            "run_blip2_stage2_vit_g_llama_7b_image_to_text_generation.yaml",
            "run_blip2_stage2_vit_g_baichuan_7b_image_to_text_generation.yaml"} <= names
    for path in files:
        config = RunConfig.from_yaml(path)
        model = config.model.model_config if config.model else None
        if model is not None and model.text_config is not None:
            seq_length = model.text_config["seq_length"]
            assert seq_length >= model.qformer_config.query_length + model.max_txt_len, path.name
