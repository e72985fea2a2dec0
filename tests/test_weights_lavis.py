"""LAVIS checkpoints: names written in the test from the LAVIS listing, parity with transformers on the same
weights, the exact way back (``to_lavis``), ViT weights from a separate EVA file, and the errors we promise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2 import Blip2Config, Blip2Qformer
from blip2.config import ConfigError
from blip2.weights import WeightLoadError
from blip2.weights.eva import read_vit_state
from blip2.weights.lavis import to_lavis
from weights_fixtures import LAVIS_DROPPED, build_hf_retrieval, hf_to_lavis, pixels, save_torch, text_batch

ATOL = 1e-5


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(transformers model, our config for it, LAVIS state dict, folder for files)."""
    hf = build_hf_retrieval()
    folder = tmp_path_factory.mktemp("lavis")
    hf.save_pretrained(folder / "hf")
    return hf, Blip2Config.from_pretrained(folder / "hf"), hf_to_lavis(hf.state_dict()), folder


@pytest.fixture(scope="module")
def loaded(case):
    _, config, lavis_state, folder = case
    path = save_torch({"model": lavis_state}, folder / "blip2_pretrained.pth")
    return Blip2Qformer.from_pretrained(path, config=config).eval()


def test_only_the_documented_keys_are_dropped(loaded):
    assert loaded.load_report.missing == []
    assert sorted(loaded.load_report.unexpected) == LAVIS_DROPPED


@torch.no_grad()
def test_lavis_checkpoint_matches_transformers_on_the_same_weights(case, loaded):
    hf = case[0]
    input_ids, attention_mask = text_batch([7, 4, 2])
    hf_itc = hf(pixels(2), input_ids, attention_mask).logits_per_image
    hf_itm = hf(pixels(3), input_ids, attention_mask, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(loaded.itc_similarity(pixels(2), input_ids, attention_mask), hf_itc, atol=ATOL, rtol=0)
    torch.testing.assert_close(loaded.itm_logits(pixels(3), input_ids, attention_mask), hf_itm, atol=ATOL, rtol=0)


def test_lavis_only_tensors_land_in_the_lm_head_and_temp(case, loaded):
    lavis_state = case[2]
    for ours, theirs in (
        (loaded.lm_head.dense.weight, "Qformer.cls.predictions.transform.dense.weight"),
        (loaded.lm_head.dense.bias, "Qformer.cls.predictions.transform.dense.bias"),
        (loaded.lm_head.norm.weight, "Qformer.cls.predictions.transform.LayerNorm.weight"),
        (loaded.lm_head.norm.bias, "Qformer.cls.predictions.transform.LayerNorm.bias"),
        (loaded.lm_head.bias, "Qformer.cls.predictions.bias"),
        (loaded.temp, "temp"),
    ):
        assert torch.equal(ours, lavis_state[theirs]), theirs


def test_lavis_round_trip_is_exact(case, loaded):
    config, lavis_state = case[1], case[2]
    back = to_lavis(loaded.state_dict(), config)
    assert sorted(back) == sorted(lavis_state)
    for key, value in lavis_state.items():
        assert torch.equal(back[key], value), key


def test_bare_state_dict_loads_like_the_wrapped_one(case, loaded):
    _, config, lavis_state, folder = case
    bare = Blip2Qformer.from_pretrained(save_torch(lavis_state, folder / "bare.pth"), config=config)
    for key, value in loaded.state_dict().items():
        assert torch.equal(bare.state_dict()[key], value), key


def _without_vit(lavis_state):
    return {key: value for key, value in lavis_state.items() if not key.startswith("visual_encoder.")}


def test_missing_vit_comes_from_the_eva_file_and_its_extra_block_is_reported(case, loaded):
    _, config, lavis_state, folder = case
    eva = {key.removeprefix("visual_encoder."): value for key, value in lavis_state.items()
           if key.startswith("visual_encoder.")}
    last = config.vision_config.num_hidden_layers  # EVA-CLIP-g stores one block more than BLIP-2 uses
    extra = {key.replace("blocks.0.", f"blocks.{last}.", 1): value + 1.0
             for key, value in eva.items() if key.startswith("blocks.0.")}
    eva_path = save_torch({**eva, **extra}, folder / "eva_vit_g.pth")
    checkpoint = save_torch({"model": _without_vit(lavis_state)}, folder / "trainable_only.pth")
    model = Blip2Qformer.from_pretrained(checkpoint, config=config, vit_checkpoint=eva_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert sorted(model.load_report.unexpected) == sorted(LAVIS_DROPPED + list(extra))
    assert model.load_report.missing == []


def test_vit_tensors_in_the_checkpoint_override_the_eva_file(case, loaded):
    """A checkpoint trained with the ViT unfrozen (COCO finetunes) holds its ViT: LAVIS loads EVA first, then it."""
    _, config, lavis_state, folder = case
    stale = {key.removeprefix("visual_encoder."): value + 1.0 for key, value in lavis_state.items()
             if key.startswith("visual_encoder.")}
    eva_path = save_torch(stale, folder / "stale_eva.pth")
    checkpoint = folder / "blip2_pretrained.pth"
    model = Blip2Qformer.from_pretrained(checkpoint, config=config, vit_checkpoint=eva_path)
    for key, value in loaded.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_missing_vit_without_vit_checkpoint_says_what_to_pass(case):
    _, config, lavis_state, folder = case
    checkpoint = save_torch({"model": _without_vit(lavis_state)}, folder / "no_vit.pth")
    with pytest.raises(WeightLoadError, match=r"no visual_encoder\.\* keys.*vit_checkpoint.*eva_vit_g\.pth"):
        Blip2Qformer.from_pretrained(checkpoint, config=config)


def test_lavis_without_config_asks_for_one(case):
    folder = case[3]
    path = save_torch({"model": case[2]}, folder / "needs_config.pth")
    with pytest.raises(ConfigError, match=r"carries no model config: pass config="):
        Blip2Qformer.from_pretrained(path)


def test_eva_position_table_is_resized_to_the_configured_image_size(case):
    _, config, lavis_state, folder = case
    eva_path = save_torch({"pos_embed": lavis_state["visual_encoder.pos_embed"]}, folder / "pos_only.pth")
    bigger = config.replace(vision_config=config.vision_config.replace(image_size=42))
    state, _ = read_vit_state(eva_path, bigger)
    stored = lavis_state["visual_encoder.pos_embed"]  # (1, 1 + 5 * 5, 36)
    grid = stored[:, 1:].reshape(1, 5, 5, 36).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(7, 7), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    expected = torch.cat((stored[:, :1], resized.reshape(1, 49, 36)), dim=1)
    assert state["vision_model.pos_embed"].shape == (1, 50, 36)
    torch.testing.assert_close(state["vision_model.pos_embed"], expected)
