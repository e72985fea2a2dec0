"""Hugging Face BLIP-2 folders: parity with transformers on shared weights, both bias layouts, generation folders,
sharded and .bin files, config translation and the way back (``to_hf``)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2 import Blip2Config, Blip2Qformer
from blip2.weights import hf as hf_adapter
from weights_fixtures import (NUM_QUERIES, VOCAB, build_hf_generation, build_hf_retrieval, hf_reference, pixels,
                              text_batch)

ATOL = 1e-5


def saved(model, tmp_path_factory, name: str):
    """(transformers model, the folder it was saved to)."""
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    return saved(build_hf_retrieval(), tmp_path_factory, "hf_itm")


@pytest.fixture(scope="module")
def ours(retrieval):
    return Blip2Qformer.from_pretrained(retrieval[1]).eval()


def _rewrite_weights(source, target, edit) -> None:
    """Copy an HF folder, passing its safetensors state through ``edit``."""
    target.mkdir()
    shutil.copy(source / "config.json", target / "config.json")
    state = edit(load_file(str(source / "model.safetensors")))
    save_file({key: value.contiguous() for key, value in state.items()}, str(target / "model.safetensors"))


@pytest.mark.parametrize("lengths", [[6, 6, 6], [7, 4, 2]], ids=["full", "padded"])
@torch.no_grad()
def test_itc_and_itm_match_transformers(retrieval, ours, lengths):
    hf, _ = retrieval
    input_ids, attention_mask = text_batch(lengths)
    itc_pixels, itm_pixels = pixels(2), pixels(3, seed=1)
    hf_itc = hf(itc_pixels, input_ids, attention_mask, use_image_text_matching_head=False).logits_per_image
    hf_itm = hf(itm_pixels, input_ids, attention_mask, use_image_text_matching_head=True).logits_per_image
    assert hf_itc.shape == (2, 3) and hf_itm.shape == (3, 2)
    torch.testing.assert_close(ours.itc_similarity(itc_pixels, input_ids, attention_mask), hf_itc, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.itm_logits(itm_pixels, input_ids, attention_mask), hf_itm, atol=ATOL, rtol=0)
    # the hand-built reference used at other image sizes agrees with transformers' own forward
    ref_itc, ref_itm = hf_reference(hf, itm_pixels, input_ids, attention_mask)
    torch.testing.assert_close(ref_itm, hf_itm, atol=ATOL, rtol=0)
    torch.testing.assert_close(ref_itc[:2], hf(itm_pixels[:2], input_ids, attention_mask).logits_per_image,
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("resize", ["at_run_time", "at_load_time"])
@torch.no_grad()
def test_other_image_size_matches_transformers_interpolation(retrieval, ours, resize):
    hf, folder = retrieval
    model = ours
    if resize == "at_load_time":
        config = Blip2Config.from_pretrained(folder)
        config.vision_config = config.vision_config.replace(image_size=42)
        model = Blip2Qformer.from_pretrained(folder, config=config).eval()
        assert model.vision_model.pos_embed.shape == (1, 50, 36)
    input_ids, attention_mask = text_batch([7, 4, 2])
    pixel_values = pixels(3, size=42)
    ref_itc, ref_itm = hf_reference(hf, pixel_values, input_ids, attention_mask)
    interpolate = resize == "at_run_time"  # another size than the model's is asked for, as in transformers
    itc = model.itc_similarity(pixel_values, input_ids, attention_mask, interpolate_pos_encoding=interpolate)
    torch.testing.assert_close(itc, ref_itc, atol=ATOL, rtol=0)
    itm = model.itm_logits(pixel_values, input_ids, attention_mask, interpolate_pos_encoding=interpolate)
    torch.testing.assert_close(itm, ref_itm, atol=ATOL, rtol=0)


def _separate_q_v_bias(state):
    out = {}
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            out[key.replace("qkv.bias", "q_bias")], out[key.replace("qkv.bias", "v_bias")] = q_bias, v_bias
        else:
            out[key] = value
    return out


@torch.no_grad()
def test_old_separate_q_v_bias_layout_loads_the_same(retrieval, ours, tmp_path):
    hf, folder = retrieval
    _rewrite_weights(folder, tmp_path / "old", _separate_q_v_bias)
    assert "vision_model.encoder.layers.0.self_attn.q_bias" in load_file(str(tmp_path / "old" / "model.safetensors"))
    old = Blip2Qformer.from_pretrained(tmp_path / "old").eval()
    for key, value in ours.state_dict().items():
        if not key.startswith(("temp", "lm_head")):  # not in the file: initial values
            assert torch.equal(old.state_dict()[key], value), key
    input_ids, attention_mask = text_batch([7, 4, 2])
    hf_itm = hf(pixels(3), input_ids, attention_mask, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(old.itm_logits(pixels(3), input_ids, attention_mask), hf_itm, atol=ATOL, rtol=0)


def test_nonzero_key_bias_is_dropped_with_a_warning(retrieval, tmp_path, caplog):
    _, folder = retrieval

    def poke(state):
        state["vision_model.encoder.layers.1.self_attn.qkv.bias"][40] = 0.5  # inside the k slice [36, 72)
        return state

    _rewrite_weights(folder, tmp_path / "kbias", poke)
    with caplog.at_level(logging.WARNING, logger="blip2.weights.hf"):
        Blip2Qformer.from_pretrained(tmp_path / "kbias")
    assert "vision_model.encoder.layers.1.self_attn.qkv.bias" in caplog.text
    assert "not zero" in caplog.text


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_model_bin"])
def test_sharded_and_bin_folders_load(retrieval, ours, tmp_path, layout):
    hf, folder = retrieval
    target = tmp_path / layout
    if layout == "sharded_safetensors":
        hf.save_pretrained(target, max_shard_size="20KB")
        assert (target / "model.safetensors.index.json").is_file()
    else:
        target.mkdir()
        shutil.copy(folder / "config.json", target / "config.json")
        torch.save(hf.state_dict(), target / "pytorch_model.bin")
    loaded = Blip2Qformer.from_pretrained(target)
    for key in ("vision_model.blocks.1.attn.q_bias", "qformer.layers.2.cross_attn.attn.v_proj.weight", "itm_head.bias"):
        assert torch.equal(loaded.state_dict()[key], ours.state_dict()[key]), key


def test_retrieval_report_lists_only_what_transformers_lacks(ours):
    assert sorted(ours.load_report.missing) == sorted(
        ["temp", "lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias", "lm_head.norm.weight",
         "lm_head.norm.bias"]
    )
    assert ours.load_report.unexpected == []


def test_retrieval_config_translation(retrieval):
    config = Blip2Config.from_pretrained(retrieval[1])
    vision, qformer = config.vision_config, config.qformer_config
    assert (vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers, vision.num_attention_heads) == (
        36, 37, 2, 4)
    assert (vision.image_size, vision.patch_size, vision.layer_norm_eps, vision.ln_vision_eps) == (30, 6, 1e-4, 1e-4)
    assert (qformer.hidden_size, qformer.num_hidden_layers, qformer.num_attention_heads, qformer.intermediate_size) == (
        32, 3, 4, 37)
    assert (qformer.query_length, qformer.cross_attention_freq, qformer.vocab_size) == (NUM_QUERIES, 2, VOCAB)
    assert (qformer.max_position_embeddings, qformer.layer_norm_eps, qformer.pad_token_id) == (20, 1e-12, 0)
    assert qformer.bos_token_id < VOCAB and qformer.sep_token_id < VOCAB
    assert qformer.bos_token_id != qformer.sep_token_id
    assert (config.embed_dim, config.max_txt_len, config.text_config) == (16, 20, None)


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    return saved(build_hf_generation(), tmp_path_factory, "hf_opt")


@torch.no_grad()
def test_generation_folder_loads_the_query_path(generation):
    hf, folder = generation
    model = Blip2Qformer.from_pretrained(folder).eval()
    report = model.load_report
    text_only = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.", "lm_head.",
                 "vision_proj.", "text_proj.", "itm_head.", "temp")
    expected_missing = [key for key in model.state_dict() if key.startswith(text_only) or ".text_ffn." in key]
    assert sorted(report.missing) == sorted(expected_missing)
    assert any(key.startswith("language_model.") for key in report.unexpected)
    # the stage-2 parts, reported under our names (language_projection is our llm_proj)
    assert all(key.startswith(("language_model.", "llm_proj.")) for key in report.unexpected)
    assert {"llm_proj.weight", "llm_proj.bias"} <= set(report.unexpected)

    pixel_values = pixels(2)
    image_embeds = hf.vision_model(pixel_values).last_hidden_state
    queries = hf.query_tokens.expand(2, -1, -1)
    hf_queries = hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    ours = model.query_forward(model.encode_image(pixel_values)).last_hidden_state
    assert ours.shape == (2, NUM_QUERIES, 32)
    torch.testing.assert_close(ours, hf_queries, atol=ATOL, rtol=0)


def test_generation_config_keeps_the_llm_config(generation, tmp_path):
    _, folder = generation
    config = Blip2Config.from_pretrained(folder)
    assert config.text_config["model_type"] == "opt"
    assert (config.text_config["hidden_size"], config.text_config["vocab_size"]) == (16, VOCAB)
    assert config.qformer_config.query_length == NUM_QUERIES
    config.to_yaml(tmp_path / "config.yaml")  # the LLM config survives our YAML round trip
    assert Blip2Config.from_yaml(tmp_path / "config.yaml").text_config == config.text_config


def test_generation_folder_with_a_stage1_config_names_the_missing_text_parts(generation):
    config = Blip2Config.from_pretrained(generation[1]).replace(text_config=None)
    with pytest.raises(RuntimeError, match=r"missing keys: .*qformer\.embeddings\.word_embeddings\.weight"):
        Blip2Qformer.from_pretrained(generation[1], config=config)


def test_to_hf_gives_back_the_transformers_state(retrieval, ours):
    hf, _ = retrieval
    expected = hf.state_dict()
    converted = hf_adapter.to_hf(ours.state_dict())
    assert sorted(converted) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key


def test_unsupported_activation_is_named(retrieval, tmp_path):
    _, folder = retrieval
    (tmp_path / "gelu_new").mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["qformer_config"]["hidden_act"] = "relu"
    (tmp_path / "gelu_new" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"qformer_config\.hidden_act='relu'"):
        Blip2Config.from_pretrained(tmp_path / "gelu_new")


def test_convert_hf_folder_writes_our_folder(retrieval, ours, tmp_path, capsys):
    from blip2.cli.convert import main as convert

    code = convert(["--from", "hf", "--input", str(retrieval[1]), "--output", str(tmp_path / "converted")])
    assert code == 0, capsys.readouterr().err
    converted = Blip2Qformer.from_pretrained(tmp_path / "converted")
    assert (tmp_path / "converted" / "config.yaml").is_file()
    assert converted.config == ours.config
    for key, value in ours.state_dict().items():
        if not key.startswith(("temp", "lm_head")):  # not in the HF file: each load draws its own initial values
            assert torch.equal(converted.state_dict()[key], value), key
