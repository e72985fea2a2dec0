"""Loading a stage-2 checkpoint that holds the LLM: the LLM is built empty (meta) and adopts the checkpoint's tensors,
never initialised randomly first (for a 7B LLM: minutes and twice its memory). Ties, dtypes and the buffers no
checkpoint holds (rotary ``inv_freq``) come out as a random build's, and a missing weight is still an error."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from blip2 import Blip2ImageToTextGeneration
from blip2.weights import llm
from blip2.weights import WeightLoadError
from tests.helpers import tiny_config
from weights_fixtures import build_hf_generation, pixels, saved_stage1

LLAMA_TEXT = {"model_type": "llama", "vocab_size": 90, "hidden_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 37,
              "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
              "tie_word_embeddings": True, "dtype": "bfloat16"}
HF_FC1 = "language_model.model.decoder.layers.0.fc1.weight"


@dataclass
class LLMBuildSpy:
    """How the LLM was built: ``build_random_causal_lm`` calls, and the devices of the parameters transformers' init touched."""

    random_builds: int = 0
    init_devices: set[str] = field(default_factory=set)


@pytest.fixture
def spy(monkeypatch) -> LLMBuildSpy:
    record = LLMBuildSpy()
    build_random, initialize = llm.build_random_causal_lm, PreTrainedModel._initialize_weights

    def spy_build_random(*args, **kwargs):
        record.random_builds += 1
        return build_random(*args, **kwargs)

    def spy_initialize(self, module, *args, **kwargs):
        record.init_devices.update(param.device.type for param in module.parameters(recurse=False))
        return initialize(self, module, *args, **kwargs)

    monkeypatch.setattr(llm, "build_random_causal_lm", spy_build_random)
    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", spy_initialize)
    return record


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """(transformers Blip2ForConditionalGeneration with a tied OPT, its folder)."""
    hf = build_hf_generation()
    folder = tmp_path_factory.mktemp("hf_opt")
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def llama_with_llm(tmp_path_factory):
    """(a random stage-2 model with a tied bf16 Llama, the folder it was saved to with include_llm=True)."""
    torch.manual_seed(0)
    model = Blip2ImageToTextGeneration(tiny_config(text_config=LLAMA_TEXT)).eval()
    folder = tmp_path_factory.mktemp("with_llm") / "model"
    model.save_pretrained(folder, include_llm=True)
    return model, folder


def without(folder, tmp_path, drop: list[str], add: dict[str, torch.Tensor] | None = None):
    """A copy of our folder ``folder`` whose model.safetensors lacks the keys ``drop`` (and holds ``add``)."""
    state = load_file(str(folder / "model.safetensors"))
    state = {key: value for key, value in state.items() if key not in drop} | (add or {})
    target = tmp_path / "edited"
    target.mkdir()
    (target / "config.yaml").write_text((folder / "config.yaml").read_text())
    save_file(state, str(target / "model.safetensors"))
    return target


# --- no random init when the checkpoint holds the LLM -----------------------------------------------------------------
@torch.no_grad()
def test_transformers_folder_builds_the_llm_empty_and_adopts_its_tensors(hf_folder, spy):
    hf, folder = hf_folder
    ours = Blip2ImageToTextGeneration.from_pretrained(folder).eval()
    assert spy.random_builds == 0
    assert spy.init_devices == {"meta"}  # transformers' init ran on shapes only: no LLM tensor was drawn
    llm_model = ours.language_model
    assert llm_model.lm_head.weight is llm_model.model.decoder.embed_tokens.weight
    assert not any(tensor.is_meta for tensor in [*ours.parameters(), *ours.buffers()])
    hf_llm = hf.language_model.state_dict()
    for key, value in llm_model.state_dict().items():
        assert torch.equal(value, hf_llm[key]), key
    assert not any(param.requires_grad for param in llm_model.parameters())  # frozen, as before


@torch.no_grad()
def test_our_folder_with_the_llm_loads_without_random_init_in_its_dtype(llama_with_llm, spy):
    model, folder = llama_with_llm
    loaded = Blip2ImageToTextGeneration.from_pretrained(folder).eval()
    assert spy.random_builds == 0 and spy.init_devices == {"meta"}
    llama = loaded.language_model
    assert llama.dtype == torch.bfloat16 and llama.lm_head.weight is llama.model.embed_tokens.weight
    # every tensor, the non-persistent rotary buffers included, as the random build that was saved has it
    for (name, value), (saved_name, saved) in zip([*loaded.named_parameters(), *loaded.named_buffers()],
                                                  [*model.named_parameters(), *model.named_buffers()]):
        assert name == saved_name and value.dtype == saved.dtype and torch.equal(value, saved), name
    assert "language_model.model.rotary_emb.inv_freq" in dict(loaded.named_buffers())
    input_ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 0]])
    assert torch.equal(loaded(pixels(2), input_ids).logits, model(pixels(2), input_ids).logits)
    assert torch.equal(loaded.generate(pixels(2), max_new_tokens=6), model.generate(pixels(2), max_new_tokens=6))


@pytest.mark.parametrize("text_config", [
    {"model_type": "gpt2", "n_embd": 24, "n_layer": 2, "n_head": 4, "n_positions": 64},
    {"model_type": "qwen2", "hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 37, "max_position_embeddings": 64},
], ids=["gpt2", "qwen2"])
@torch.no_grad()
def test_other_llms_come_back_with_their_ties_buffers_and_logits(text_config, tmp_path, spy):
    torch.manual_seed(0)
    model = Blip2ImageToTextGeneration(tiny_config(text_config={**text_config, "vocab_size": 90})).eval()
    model.save_pretrained(tmp_path / "model", include_llm=True)
    loaded = Blip2ImageToTextGeneration.from_pretrained(tmp_path / "model").eval()
    assert spy.random_builds == 1  # the saved model's own
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    loaded_tensors = [*loaded.named_parameters(remove_duplicate=False), *loaded.named_buffers()]
    assert [name for name, _ in loaded_tensors] == [name for name, _ in tensors]
    assert all(torch.equal(value, saved) for (_, value), (_, saved) in zip(loaded_tensors, tensors))
    tied = [llm_model.get_input_embeddings().weight is llm_model.get_output_embeddings().weight
            for llm_model in (model.language_model, loaded.language_model)]
    assert tied[0] == tied[1]
    input_ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.equal(loaded(pixels(1), input_ids).logits, model(pixels(1), input_ids).logits)


def test_bare_text_config_still_initialises_the_llm_randomly(spy):
    Blip2ImageToTextGeneration(tiny_config(text_config=LLAMA_TEXT))
    assert spy.random_builds == 1 and "cpu" in spy.init_devices


def test_stage1_start_without_an_llm_folder_still_initialises_the_llm_randomly(tmp_path_factory, spy):
    _, folder = saved_stage1(tiny_config(), tmp_path_factory, "stage1")
    model = Blip2ImageToTextGeneration.from_pretrained(folder, config=tiny_config(text_config=LLAMA_TEXT))
    assert spy.random_builds == 1 and "cpu" in spy.init_devices
    assert not any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])


# --- what the checkpoint lacks is an error, never a meta tensor -------------------------------------------------------
def test_transformers_folder_missing_an_llm_weight_names_it(hf_folder, tmp_path):
    _, folder = hf_folder
    state = load_file(str(folder / "model.safetensors"))
    del state[HF_FC1]
    edited = tmp_path / "hf_without_fc1"
    edited.mkdir()
    (edited / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, str(edited / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightLoadError, match=f"1 missing keys: {HF_FC1}$"):
        Blip2ImageToTextGeneration.from_pretrained(edited)


def test_our_folder_missing_an_llm_weight_names_it(llama_with_llm, tmp_path):
    missing = "language_model.model.layers.1.mlp.down_proj.weight"
    with pytest.raises(WeightLoadError, match=f"1 missing keys: {missing}$"):
        Blip2ImageToTextGeneration.from_pretrained(without(llama_with_llm[1], tmp_path, [missing]))


def test_an_llm_weight_left_on_meta_where_missing_keys_are_allowed_is_named(llama_with_llm, tmp_path):
    """A stage-1 key (``temp``) lets ``language_model.*`` be missing; an LLM built empty must still be filled."""
    missing = "language_model.model.layers.0.self_attn.q_proj.weight"
    folder = without(llama_with_llm[1], tmp_path, [missing], add={"temp": torch.tensor(0.07)})
    with pytest.raises(WeightLoadError, match=f"1 tensors of Blip2ImageToTextGeneration got no values .*: {missing}$"):
        Blip2ImageToTextGeneration.from_pretrained(folder)
