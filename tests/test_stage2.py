"""Stage 2: parity with transformers' Blip2ForConditionalGeneration (logits, loss, generated tokens), stage 1 as the
start of stage 2, the LAVIS blip2_opt layout, our folder without a copy of the LLM, and the errors we promise."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from blip2 import Blip2Config, Blip2ImageToTextGeneration
from blip2.config import ConfigError
from blip2.models.stage2 import IGNORE_INDEX
from blip2.weights import WeightLoadError
from blip2.weights.lavis import to_lavis
from tests.helpers import tiny_config
from weights_fixtures import NUM_QUERIES, VOCAB, build_hf_generation, pixels, save_torch, saved_stage1

ATOL = 1e-4
HF_IMAGE_TOKEN = VOCAB - 2  # build_hf_generation's image_token_index
OPT_BOS, OPT_PAD = 2, 1
STAGE1_ONLY = ("qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings.", "lm_head.",
               "vision_proj.", "text_proj.", "itm_head.", "temp")


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_opt(tmp_path_factory):
    """(transformers Blip2ForConditionalGeneration with OPT, the folder it was saved to)."""
    hf = build_hf_generation()
    with torch.no_grad():
        hf.language_projection.weight.mul_(20)  # the queries then steer the LLM visibly
    folder = tmp_path_factory.mktemp("hf_blip2_opt")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def ours_opt(hf_opt):
    return Blip2ImageToTextGeneration.from_pretrained(hf_opt[1]).eval()


def llm_folder(tmp_path_factory, name: str = "llm", hidden_size: int = 24, seed: int = 0):
    """A tiny random LLaMA saved as a transformers folder (vocabulary 90: bos 1, eos 2, pad 0).

    Its weights are drawn ten times wider than transformers' default, so its logits span a range a soft prompt can
    move (at std 0.02 the frozen LLM predicts a near-uniform distribution whatever it reads).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=90, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, initializer_range=0.2)
    folder = tmp_path_factory.mktemp(name)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return llm_folder(tmp_path_factory)


def stage2_config(llm_dir, **overrides) -> Blip2Config:
    return tiny_config(text_config={"checkpoint_name_or_path": str(llm_dir), "seq_length": 40}, **overrides)


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory):
    """(stage-1 model, its saved folder)."""
    return saved_stage1(tiny_config(), tmp_path_factory, "stage1")


@pytest.fixture(scope="module")
def from_stage1(stage1_dir, llama_dir):
    return Blip2ImageToTextGeneration.from_pretrained(stage1_dir[1], config=stage2_config(llama_dir))


def hf_prompts(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded OPT prompts: [pad ...][BOS][words]; ``lengths`` count the BOS."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.full((len(lengths), length), OPT_PAD)
    attention_mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, size in enumerate(lengths):
        input_ids[row, length - size] = OPT_BOS
        input_ids[row, length - size + 1:] = torch.randint(3, HF_IMAGE_TOKEN, (size - 1,), generator=generator)
        attention_mask[row, length - size:] = 1
    return input_ids, attention_mask


def with_image_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' processor layout: the <image> ids first, then the (padded) text."""
    image_ids = torch.full((input_ids.shape[0], NUM_QUERIES), HF_IMAGE_TOKEN)
    return torch.cat((image_ids, input_ids), 1), torch.cat((torch.ones_like(image_ids), attention_mask), 1)


# --- parity with transformers ----------------------------------------------------------------------------------------
def test_transformers_folder_loads_every_tensor(ours_opt):
    assert ours_opt.load_report.missing == [] and ours_opt.load_report.unexpected == []
    assert ours_opt.llm_proj.weight.shape == (16, 32)
    assert type(ours_opt.language_model).__name__ == "OPTForCausalLM"


@torch.no_grad()
def test_logits_and_loss_match_transformers(hf_opt, ours_opt):
    hf, _ = hf_opt
    input_ids = torch.randint(3, HF_IMAGE_TOKEN, (3, 7), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0] = OPT_BOS
    attention_mask = (torch.arange(7)[None] < torch.tensor([7, 4, 6])[:, None]).long()  # right padding
    input_ids = input_ids.masked_fill(attention_mask == 0, OPT_PAD)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX  # transformers' loss never asks the last query for the first token
    hf_logits = hf(pixels(3), *with_image_tokens(input_ids, attention_mask)).logits
    # transformers' own loss: its text logits shifted against the labels (its labels= path fails on a
    # non-contiguous slice in 5.24, so the same sum is written out here)
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits[:, NUM_QUERIES:-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    ours = ours_opt(pixels(3), input_ids, attention_mask, labels=labels)
    assert ours.logits.shape == (3, NUM_QUERIES + 7, VOCAB)
    torch.testing.assert_close(ours.logits, hf_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.loss, hf_loss, atol=ATOL, rtol=0)


@torch.no_grad()
def test_greedy_generation_of_left_padded_prompts_matches_transformers(hf_opt, ours_opt):
    hf, _ = hf_opt
    input_ids, attention_mask = hf_prompts([5, 2, 4])
    hf_ids = hf.generate(pixels(3), *with_image_tokens(input_ids, attention_mask), max_new_tokens=14)
    ours = ours_opt.generate(pixels(3), input_ids, attention_mask, max_new_tokens=14)
    assert ours.shape == (3, 14)
    assert torch.equal(ours, hf_ids[:, NUM_QUERIES + input_ids.shape[1]:])
    assert len({tuple(row) for row in ours.tolist()}) == 3


@torch.no_grad()
def test_generation_without_a_prompt_starts_from_bos_as_transformers_does(hf_opt, ours_opt):
    hf, _ = hf_opt
    hf_ids = hf.generate(pixels(2, seed=5), max_new_tokens=12)
    ours = ours_opt.generate(pixels(2, seed=5), max_new_tokens=12)
    assert torch.equal(hf_ids[:, : NUM_QUERIES + 1], torch.tensor([[HF_IMAGE_TOKEN] * NUM_QUERIES + [OPT_BOS]] * 2))
    assert torch.equal(ours, hf_ids[:, NUM_QUERIES + 1:])


@pytest.mark.parametrize("settings", [
    dict(num_beams=3, length_penalty=0.5, num_return_sequences=2),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9),
], ids=["beam", "sampling"])
@torch.no_grad()
def test_beam_search_and_sampling_match_transformers(hf_opt, ours_opt, settings):
    hf, _ = hf_opt
    input_ids, attention_mask = hf_prompts([5, 2, 4])
    torch.manual_seed(0)
    hf_ids = hf.generate(pixels(3), *with_image_tokens(input_ids, attention_mask), max_new_tokens=8, **settings)
    torch.manual_seed(0)
    ours = ours_opt.generate(pixels(3), input_ids, attention_mask, max_new_tokens=8, **settings)
    assert torch.equal(ours, hf_ids[:, NUM_QUERIES + input_ids.shape[1]:])


@torch.no_grad()
def test_left_padded_llama_batch_generates_what_each_prompt_does_alone(llama_dir):
    """LLaMA takes its positions from the attention mask too: padding between queries and prompt changes nothing."""
    torch.manual_seed(0)
    model = Blip2ImageToTextGeneration(stage2_config(llama_dir)).eval()
    prompts = [[1, 5, 6, 7, 8], [1, 9], [1, 10, 11, 12]]
    input_ids = torch.zeros(3, 5, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, 5 - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, 5 - len(prompt):] = 1
    settings = dict(max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.3)
    batch = model.generate(pixels(3), input_ids, attention_mask, **settings)
    alone = [model.generate(pixels(3)[row:row + 1], torch.tensor([prompt]), **settings)
             for row, prompt in enumerate(prompts)]
    assert batch.shape == (3, 12)
    assert torch.equal(batch, torch.cat(alone))


def test_seed_generation_settings_in_text_config_are_the_defaults(llama_dir):
    text_config = {"checkpoint_name_or_path": str(llama_dir), "seq_length": 40, "max_decode_length": 512,
                   "use_past": True, "do_sample": False, "top_k": 3, "top_p": 1.0, "repetition_penalty": 1.0}
    model = Blip2ImageToTextGeneration(tiny_config(text_config=text_config)).eval()
    assert model.generation_defaults() == {"do_sample": False, "repetition_penalty": 1.0, "use_cache": True,
                                           "max_length": 40}
    # max_length counts the 5 queries and the BOS, as in the seed; min_new_tokens keeps eos away
    assert model.generate(pixels(1), min_new_tokens=34).shape == (1, 34)
    assert model.generate(pixels(1), max_new_tokens=3).shape == (1, 3)  # the caller's limit replaces the default
    no_limits = {key: value for key, value in text_config.items() if key not in ("seq_length", "max_decode_length")}
    model.config.text_config = no_limits
    assert model.generation_defaults()["max_new_tokens"] == model.config.max_txt_len


# --- training --------------------------------------------------------------------------------------------------------
def test_labels_mask_padding_and_the_fixed_prompt(llama_dir):
    model = Blip2ImageToTextGeneration(stage2_config(llama_dir, prompt="a photo of", prompt_length=2))
    input_ids = torch.tensor([[1, 7, 8, 9, 2], [1, 7, 5, 0, 0]])
    labels = model.text_labels(input_ids, (input_ids != 0).long())
    assert labels.tolist() == [[-100, -100, 8, 9, 2], [-100, -100, 5, -100, -100]]
    output = model(pixels(2), input_ids)  # the attention mask defaults to the non-pad tokens
    logits = output.logits.float()
    targets = torch.tensor([[8, 9, 2], [5, -100, -100]])
    expected = torch.nn.functional.cross_entropy(  # rows Q + 1 .. Q + 3 predict tokens 2 .. 4
        logits[:, NUM_QUERIES + 1: NUM_QUERIES + 4].flatten(0, 1), targets.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(output.loss, expected)


def test_only_the_query_path_and_projection_train(llama_dir):
    model = Blip2ImageToTextGeneration(stage2_config(llama_dir)).train()
    trainable = {name.split(".")[0] for name, param in model.named_parameters() if param.requires_grad}
    assert trainable == {"ln_vision", "query_tokens", "qformer", "llm_proj"}
    assert not model.vision_model.training and not model.language_model.training
    assert not hasattr(model, "lm_head") and model.qformer.embeddings.word_embeddings is None
    assert all(layer.text_ffn is None for layer in model.qformer.layers)


def test_llm_weights_take_the_dtype_text_config_names(llama_dir):
    config = tiny_config(text_config={"checkpoint_name_or_path": str(llama_dir), "dtype": "bfloat16"})
    model = Blip2ImageToTextGeneration(config)
    assert model.language_model.dtype == torch.bfloat16
    assert model.llm_proj.weight.dtype == model.query_tokens.dtype == torch.float32
    output = model(pixels(2), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]))
    assert output.logits.dtype == torch.bfloat16 and output.loss.dtype == torch.float32
    output.loss.backward()
    assert model.llm_proj.weight.grad is not None and model.llm_proj.weight.grad.dtype == torch.float32


def test_stage2_loss_falls_from_a_stage1_start(stage1_dir, llama_dir):
    """Two image classes, one caption each: the soft prompt learns to steer the frozen LLM to the captions."""
    config = stage2_config(llama_dir, prompt_length=1)  # the BOS is not a target
    model = Blip2ImageToTextGeneration.from_pretrained(stage1_dir[1], config=config).train()
    frozen_llm = {key: value.clone() for key, value in model.language_model.state_dict().items()}
    torch.manual_seed(0)
    images = torch.cat((torch.randn(4, 3, 30, 30) + 1.5, torch.randn(4, 3, 30, 30) - 1.5))
    captions = torch.tensor([[1, 10, 11, 12, 13, 2]] * 4 + [[1, 20, 21, 22, 23, 2]] * 4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(images, captions).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(value, frozen_llm[key]) for key, value in model.language_model.state_dict().items())


# --- stage 1 as the start of stage 2 ---------------------------------------------------------------------------------
def test_stage1_folder_carries_over_the_image_path_exactly(stage1_dir, llama_dir):
    stage1, folder = stage1_dir
    model = Blip2ImageToTextGeneration.from_pretrained(folder, config=stage2_config(llama_dir))
    stage1_state, state = stage1.state_dict(), model.state_dict()
    carried = [key for key in state if not key.startswith(("llm_proj.", "language_model."))]
    assert carried and all(key in stage1_state for key in carried)
    for key in carried:
        assert torch.equal(state[key], stage1_state[key]), key
    dropped = sorted(key for key in stage1_state if key.startswith(STAGE1_ONLY) or ".text_ffn." in key)
    assert sorted(model.load_report.unexpected) == dropped
    assert sorted(model.load_report.missing) == ["llm_proj.bias", "llm_proj.weight"]  # the LLM came from its folder


def test_lavis_stage1_checkpoint_starts_stage2(stage1_dir, llama_dir, tmp_path):
    stage1, _ = stage1_dir
    path = save_torch({"model": to_lavis(stage1.state_dict(), stage1.config)}, tmp_path / "blip2_pretrained.pth")
    model = Blip2ImageToTextGeneration.from_pretrained(path, config=stage2_config(llama_dir))
    for key in ("vision_model.blocks.1.attn.q_bias", "qformer.layers.2.cross_attn.attn.v_proj.weight", "query_tokens",
                "ln_vision.weight", "qformer.layers.0.query_ffn.output.norm.bias"):
        assert torch.equal(model.state_dict()[key], stage1.state_dict()[key]), key
    assert "Qformer.cls.predictions.decoder.weight" in model.load_report.unexpected
    assert "temp" in model.load_report.unexpected and "itm_head.weight" in model.load_report.unexpected
    assert sorted(model.load_report.missing) == ["llm_proj.bias", "llm_proj.weight"]


# --- LAVIS blip2_opt, our own folder ---------------------------------------------------------------------------------
@torch.no_grad()
def test_lavis_blip2_opt_layout_loads(from_stage1, llama_dir, tmp_path):
    trained = {key: value for key, value in from_stage1.state_dict().items() if not key.startswith("language_model.")}
    lavis_state = to_lavis(trained, from_stage1.config)  # LAVIS saves no frozen LLM
    assert {"opt_proj.weight", "opt_proj.bias", "query_tokens", "ln_vision.weight"} <= set(lavis_state)
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in lavis_state
    assert not any(key.startswith(("opt_model.", "Qformer.cls.")) for key in lavis_state)
    path = save_torch({"model": lavis_state}, tmp_path / "blip2_opt.pth")
    model = Blip2ImageToTextGeneration.from_pretrained(path, config=stage2_config(llama_dir)).eval()
    assert model.load_report.missing == []
    assert model.load_report.unexpected == ["Qformer.bert.embeddings.position_ids"]
    for key, value in from_stage1.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@torch.no_grad()
def test_our_folder_refers_to_the_llm_and_loads_back_identically(from_stage1, llama_dir, tmp_path):
    from_stage1.eval()
    from_stage1.save_pretrained(tmp_path / "stage2")
    saved = load_file(str(tmp_path / "stage2" / "model.safetensors"))
    assert not any(key.startswith("language_model.") for key in saved) and "llm_proj.weight" in saved
    config = yaml.safe_load((tmp_path / "stage2" / "config.yaml").read_text())
    assert config["text_config"]["checkpoint_name_or_path"] == str(llama_dir)
    loaded = Blip2ImageToTextGeneration.from_pretrained(tmp_path / "stage2").eval()
    assert loaded.load_report.missing == [] and loaded.load_report.unexpected == []
    for key, value in from_stage1.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    assert torch.equal(loaded(pixels(2), input_ids).logits, from_stage1(pixels(2), input_ids).logits)
    assert torch.equal(loaded.generate(pixels(2), max_new_tokens=6), from_stage1.generate(pixels(2), max_new_tokens=6))


def test_include_llm_writes_a_self_contained_folder(ours_opt, tmp_path):
    """A model whose LLM came from a transformers BLIP-2 file has no folder to refer to: the LLM is written."""
    ours_opt.save_pretrained(tmp_path / "with_llm")
    saved = load_file(str(tmp_path / "with_llm" / "model.safetensors"))
    assert "language_model.model.decoder.embed_tokens.weight" in saved
    assert "language_model.lm_head.weight" not in saved  # tied to the embeddings: written once
    loaded = Blip2ImageToTextGeneration.from_pretrained(tmp_path / "with_llm")
    for key, value in ours_opt.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_convert_transformers_generation_folder_writes_a_stage2_folder(hf_opt, ours_opt, tmp_path, capsys):
    from blip2.cli.convert import main as convert

    code = convert(["--from", "hf", "--input", str(hf_opt[1]), "--output", str(tmp_path / "converted")])
    assert code == 0, capsys.readouterr().err
    converted = Blip2ImageToTextGeneration.from_pretrained(tmp_path / "converted")
    for key, value in ours_opt.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


# --- errors ----------------------------------------------------------------------------------------------------------
def test_projection_for_another_llm_names_both_widths(from_stage1, tmp_path_factory, tmp_path):
    from_stage1.save_pretrained(tmp_path / "stage2")
    wider = llm_folder(tmp_path_factory, "wider_llm", hidden_size=40)
    with pytest.raises(WeightLoadError, match=r"llm_proj projects to width 24, but the language model .* width 40"):
        Blip2ImageToTextGeneration.from_pretrained(tmp_path / "stage2", config=stage2_config(wider))


def test_stated_hidden_size_must_be_the_llm_folders(llama_dir):
    config = stage2_config(llama_dir)
    config.text_config["hidden_size"] = 4096
    with pytest.raises(WeightLoadError, match=r"hidden_size=4096 \(checkpoint: 24\)"):
        Blip2ImageToTextGeneration(config)


def test_missing_llm_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(WeightLoadError, match=f"does not exist: {missing}"):
        Blip2ImageToTextGeneration(stage2_config(missing))


def test_seq_length_must_hold_the_queries_and_the_caption(llama_dir):
    text_config = {"checkpoint_name_or_path": str(llama_dir), "seq_length": 20}
    with pytest.raises(ConfigError, match=r"seq_length=20 .*query_length=5 \+ max_txt_len=16 = 21"):
        tiny_config(text_config=text_config)


def test_stage1_config_alone_cannot_build_stage2(stage1_dir):
    with pytest.raises(ConfigError, match="needs text_config"):
        Blip2ImageToTextGeneration.from_pretrained(stage1_dir[1])


@pytest.mark.parametrize("name", ["itt_blip2_stage2_vit_g_llama_7b", "blip2_stage2_vit_g_baichuan_7b"])
def test_presets_say_where_the_weights_and_the_llm_go(tmp_path, monkeypatch, name):
    monkeypatch.setenv("BLIP2_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        Blip2ImageToTextGeneration.from_pretrained(name)
    message = str(error.value)
    weights = "itt_blip2_stage2_vit_g_llama_7b" if name.startswith("itt") else "blip2_stage1_vit_g"
    llm = "llama_7b" if "llama" in name else "baichuan_7b"
    assert str(tmp_path / weights) in message and "model.safetensors" in message
    assert str(tmp_path / llm) in message and "config.json" in message


def test_support_list_and_preset_configs():
    names = Blip2ImageToTextGeneration.show_support_list()
    assert {"blip2_stage2_vit_g_llama_7b", "blip2_stage2_vit_g_baichuan_7b", "itt_blip2_stage2_vit_g_llama_7b",
            "itt_blip2_stage2_vit_g_baichuan_7b", "blip2_opt_2.7b", "blip2_stage2_tiny"} <= set(names)
    assert "blip2_stage1_vit_g" not in names
    text = Blip2Config.from_pretrained("itt_blip2_stage2_vit_g_llama_7b").text_config
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"], text["vocab_size"]) == (
        4096, 32, 32, 32000)
    assert (text["rms_norm_eps"], text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (1e-6, 1, 2, 0)
    assert text["seq_length"] == 64 and text["checkpoint_name_or_path"].endswith("llama_7b")
    tiny = Blip2ImageToTextGeneration.from_pretrained("blip2_stage2_tiny")
    assert tiny.generate(torch.randn(1, 3, 32, 32), max_new_tokens=3).shape == (1, 3)
