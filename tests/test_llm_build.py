"""How the stage-2 LLM is built: from an LLM folder its weights are read and adopted, never drawn at random first
(for a 7B LLM: minutes and twice its memory); an LLM whose weights come next is built on the meta device the way
transformers builds one, with ``nn.Module`` left as torch defines it; a built LLM can be handed to the model."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from blip2 import Blip2ImageToTextGeneration
from blip2.weights.llm import build_empty_causal_lm, build_random_causal_lm, config_from_keys, load_causal_lm
from tests.helpers import tiny_config
from llm_fixtures import write_baichuan, write_llama

LLAMA_TEXT = {"model_type": "llama", "vocab_size": 90, "hidden_size": 24, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 37,
              "max_position_embeddings": 64, "tie_word_embeddings": True}


@dataclass
class InitSpy:
    """Modules whose weights transformers' init wrote or drew random numbers for, and whether ``nn.Module``'s
    ``register_parameter`` was still torch's own whenever a transformers model was being built."""

    written: list[str] = field(default_factory=list)
    register_parameter_patched: list[bool] = field(default_factory=list)


@pytest.fixture
def spy(monkeypatch) -> InitSpy:
    record = InitSpy()
    initialize, post_init = PreTrainedModel._initialize_weights, PreTrainedModel.post_init
    register_parameter = nn.Module.register_parameter

    def spy_initialize(self, module, *args, **kwargs):
        params = [param for param in module.parameters(recurse=False) if not param.is_meta]
        before, rng = [param.detach().clone() for param in params], torch.random.get_rng_state()
        initialize(self, module, *args, **kwargs)
        drew = not torch.equal(rng, torch.random.get_rng_state())
        if drew or any(not torch.equal(old, param) for old, param in zip(before, params)):
            record.written.append(type(module).__name__)

    def spy_post_init(self, *args, **kwargs):  # runs inside every model's __init__, while any patch would be active
        record.register_parameter_patched.append(nn.Module.register_parameter is not register_parameter)
        return post_init(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", spy_initialize)
    monkeypatch.setattr(PreTrainedModel, "post_init", spy_post_init)
    return record


@pytest.mark.parametrize("layout", ["llama", "baichuan"])
@torch.no_grad()
def test_stage2_model_from_an_llm_folder_never_initialises_the_llm_randomly(llama, tmp_path, spy, layout):
    folder = (write_llama(llama, tmp_path, tokenizer=False) if layout == "llama" else
              write_baichuan(llama, tmp_path, fmt="safetensors", shards=2, tokenizer=False))
    model = Blip2ImageToTextGeneration(tiny_config(text_config={"checkpoint_name_or_path": str(folder)}))
    assert spy.written == []  # transformers' init ran over the LLM (the rotary buffers) but wrote no weight
    assert spy.register_parameter_patched and not any(spy.register_parameter_patched)
    assert model.llm_folder == str(folder)
    for (name, value), (_, saved) in zip(model.language_model.named_parameters(), llama.named_parameters()):
        assert torch.equal(value, saved), name


def test_stage2_model_from_a_checkpoint_holding_the_llm_leaves_nn_module_alone(tmp_path, spy):
    torch.manual_seed(0)
    Blip2ImageToTextGeneration(tiny_config(text_config=LLAMA_TEXT)).save_pretrained(tmp_path / "m", include_llm=True)
    spy.register_parameter_patched.clear()
    loaded = Blip2ImageToTextGeneration.from_pretrained(tmp_path / "m")
    assert spy.register_parameter_patched and not any(spy.register_parameter_patched)  # the LLM was built on meta without patching nn.Module
    assert not any(tensor.is_meta for tensor in [*loaded.parameters(), *loaded.buffers()])


def test_empty_llm_has_meta_parameters_and_the_random_builds_buffers():
    text_config = {**LLAMA_TEXT, "dtype": "bfloat16"}
    torch.manual_seed(0)
    rng = torch.random.get_rng_state()
    empty = build_empty_causal_lm(config_from_keys(text_config), torch.bfloat16)
    assert torch.equal(rng, torch.random.get_rng_state())  # nothing drawn
    assert all(param.is_meta and param.dtype == torch.bfloat16 for param in empty.parameters())
    assert empty.lm_head.weight is empty.model.embed_tokens.weight
    random = build_random_causal_lm(text_config, torch.bfloat16)
    buffers, random_buffers = dict(empty.named_buffers()), dict(random.named_buffers())
    assert buffers.keys() == random_buffers.keys() and buffers
    for name, value in buffers.items():
        assert value.device.type == "cpu" and value.dtype == random_buffers[name].dtype, name
        assert torch.equal(value, random_buffers[name]), name


def test_a_built_llm_is_used_as_given(llama):
    model = Blip2ImageToTextGeneration(tiny_config(text_config={"model_type": "llama"}), language_model=llama)
    assert model.language_model is llama
    assert model.llm_proj.out_features == llama.config.hidden_size
    assert not any(param.requires_grad for param in llama.parameters())  # freeze_text applies to it


def test_load_causal_lm_with_empty_and_a_folder_reads_the_folder(llama, tmp_path):
    folder = write_llama(llama, tmp_path, tokenizer=False)
    model = load_causal_lm({"checkpoint_name_or_path": str(folder)}, empty=True)
    assert not any(param.is_meta for param in model.parameters())
