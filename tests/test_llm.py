"""The stage-2 LLM and its tokenizer from local folders: Llama/OPT/GPT-2 as transformers saves them, Baichuan-7B read
as a Llama without remote code, bf16 loads without a float32 copy, sharded checkpoints, random init from
``text_config``, and one clear error for each way a folder can be wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from blip2.processing.llm_tokenizer import SentencePieceTokenizer, load_llm_tokenizer
from blip2.weights.llm import BLIP2_TEXT_KEYS, LLMLoadError, UnsupportedLLMError, load_causal_lm, load_llm_config
from blip2.weights import WeightLoadError
from llm_fixtures import (VOCAB, baichuan_config_json, baichuan_state_dict, tiny_llama, tiny_llama_config,
                          write_baichuan, write_byte_level_bpe, write_llama)

INPUT_IDS = torch.tensor([[1, 5, 9, 200, 3, 77, 150], [1, 42, 42, 7, 299, 0, 0]])
ATTENTION_MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])
TEXTS = ["a dog is running on the beach", "the cat sits near 42 snowy hills ✓"]  # ✓ is outside the pieces


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK).logits


@pytest.fixture(scope="module")
def llama_folder(llama, tmp_path_factory):
    return write_llama(llama, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def baichuan_folder(llama, tmp_path_factory):
    return write_baichuan(llama, tmp_path_factory.mktemp("baichuan"))


def lm(folder, **kwargs):
    return load_causal_lm({"checkpoint_name_or_path": str(folder)}, **kwargs)


# ---------------------------------------------------------------------------------------------------- loading


def test_llama_folder_gives_the_saved_models_logits(llama, llama_folder):
    model = lm(llama_folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert torch.equal(logits(model), logits(llama))


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_baichuan_checkpoint_gives_the_same_logits_as_the_llama_checkpoint(llama, llama_folder, tmp_path, fmt):
    folder = write_baichuan(llama, tmp_path / "baichuan", fmt=fmt, tokenizer=False)
    model = lm(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.max_position_embeddings == llama.config.max_position_embeddings
    assert not model.config.tie_word_embeddings
    assert torch.equal(logits(model), logits(lm(llama_folder)))


def test_baichuan_w_pack_rows_are_query_key_value_in_that_order(llama, baichuan_folder):
    attention = lm(baichuan_folder).model.layers[1].self_attn
    reference = llama.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(attention, name).weight, getattr(reference, name).weight), name


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_baichuan_checkpoint_with_index_loads(llama, tmp_path, fmt):
    folder = write_baichuan(llama, tmp_path / "sharded", fmt=fmt, shards=3, tokenizer=False)
    assert len(list(folder.glob(f"*-of-00003.{'bin' if fmt == 'bin' else 'safetensors'}"))) == 3
    assert torch.equal(logits(lm(folder)), logits(llama))


def test_sharded_llama_saved_by_transformers_loads(llama, tmp_path):
    folder = write_llama(llama, tmp_path / "sharded", max_shard_size="60KB", tokenizer=False)
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(lm(folder)), logits(llama))


@pytest.mark.parametrize("model_type", ["opt", "gpt2"])
def test_other_transformers_causal_lms_load_as_transformers_loads_them(model_type, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    torch.manual_seed(0)
    config = (OPTConfig(hidden_size=36, num_hidden_layers=2, ffn_dim=37, num_attention_heads=4, vocab_size=VOCAB,
                        max_position_embeddings=64, word_embed_proj_dim=36) if model_type == "opt" else
              GPT2Config(n_embd=36, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                         eos_token_id=2))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = lm(tmp_path)
    assert type(model) is type(reference)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as transformers ties them
    assert torch.equal(logits(model), logits(reference))


class CreatedBytes(TorchDispatchMode):
    """Bytes of the tensors operations create, by dtype (views excluded). A float32 copy of the model shows up
    under float32, a second bf16 copy doubles bf16; a good bf16 load creates the model once in bf16 and only the
    rotary frequencies in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    size = tensor.numel() * tensor.element_size()
                    self.by_dtype[tensor.dtype] = self.by_dtype.get(tensor.dtype, 0) + size
        return out


@pytest.mark.parametrize("layout", ["llama", "baichuan"])
def test_bf16_load_makes_no_float32_copy_of_the_model(llama, tmp_path, monkeypatch, layout):
    # half-precision files, as 7B checkpoints ship; the dispatch mode sees one thread, so load on one thread
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")
    if layout == "llama":
        tiny_llama().half().save_pretrained(tmp_path)
    else:
        write_baichuan(llama, tmp_path, fmt="bin", dtype=torch.float16, tokenizer=False)
    numel = sum(param.numel() for param in llama.parameters())

    with CreatedBytes() as created:
        model = lm(tmp_path, dtype=torch.bfloat16)
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert created.by_dtype.get(torch.float32, 0) < 0.01 * numel * 4
    assert created.by_dtype[torch.bfloat16] <= 1.01 * numel * 2  # converted once, then adopted without a copy

    with CreatedBytes() as naive:  # the counter does catch the float32-then-cast way
        lm(tmp_path, dtype=torch.float32).to(torch.bfloat16)
    assert naive.by_dtype[torch.float32] >= numel * 4


def test_bf16_load_from_float32_files_matches_casting_the_float32_model(llama, baichuan_folder):
    model = lm(baichuan_folder, dtype="bfloat16")
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # recomputed, not cast
    cast = lm(baichuan_folder).to(torch.bfloat16)
    for (name, param), (_, expected) in zip(model.named_parameters(), cast.named_parameters()):
        assert torch.equal(param, expected), name


def test_llm_is_frozen_and_in_eval_mode_unless_trainable(llama_folder):
    frozen = lm(llama_folder)
    assert not frozen.training
    assert not any(param.requires_grad for param in frozen.parameters())
    trainable = lm(llama_folder, trainable=True)
    assert all(param.requires_grad for param in trainable.parameters())


def test_device_argument_places_parameters_and_buffers(llama_folder):
    model = lm(llama_folder, device="cpu")
    assert {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]} == {"cpu"}


# ---------------------------------------------------------------------------------------------------- random init


def test_random_init_from_text_config_strips_our_own_keys():
    text_config = {"model_type": "llama", "hidden_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "intermediate_size": 37, "vocab_size": VOCAB, "checkpoint_name_or_path": None, "seq_length": 64,
                   "max_decode_length": 512, "use_past": True, "do_sample": False, "top_k": 3, "top_p": 1.0,
                   "repetition_penalty": 1.0}
    assert BLIP2_TEXT_KEYS <= set(text_config)
    model = load_causal_lm(text_config, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.hidden_size, model.config.intermediate_size, model.config.vocab_size) == (40, 37, VOCAB)
    for key in BLIP2_TEXT_KEYS - {"do_sample", "top_k", "top_p", "repetition_penalty"}:
        assert not hasattr(model.config, key), key
    assert model.config.to_dict().get("top_k") is None  # our top_k is a generation setting, not the model's
    assert {param.dtype for param in model.parameters()} == {torch.bfloat16}
    assert not any(param.requires_grad for param in model.parameters())


def test_random_baichuan_is_the_llama_a_baichuan_folder_gives(baichuan_folder):
    raw = baichuan_config_json(tiny_llama_config())
    model = load_causal_lm({key: value for key, value in raw.items() if key not in ("architectures", "auto_map")})
    assert type(model).__name__ == "LlamaForCausalLM"
    folder_config = load_llm_config({"checkpoint_name_or_path": str(baichuan_folder), "model_type": "baichuan"})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "pad_token_id"):
        assert getattr(model.config, key) == getattr(folder_config, key) == getattr(tiny_llama_config(), key), key


# ---------------------------------------------------------------------------------------------------- errors


def test_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_llm"
    with pytest.raises(LLMLoadError, match=f"folder does not exist: {missing}"):
        lm(missing)


def test_folder_without_config_json(llama_folder, tmp_path):
    shutil.copy(llama_folder / "model.safetensors", tmp_path)
    with pytest.raises(LLMLoadError, match="has no config.json"):
        lm(tmp_path)


def test_folder_without_weights_names_the_files_looked_for(llama_folder, tmp_path):
    shutil.copy(llama_folder / "config.json", tmp_path)
    with pytest.raises(LLMLoadError, match="no weight files: looked for model.safetensors.index.json, "
                                           "model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin"):
        lm(tmp_path)


def test_index_naming_a_missing_shard(llama, tmp_path):
    folder = write_baichuan(llama, tmp_path, fmt="safetensors", shards=2, tokenizer=False)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LLMLoadError, match="1 shard files that are missing: model-00002-of-00002.safetensors"):
        lm(folder)


def test_baichuan_w_pack_of_an_unexpected_shape(llama, tmp_path):
    state = baichuan_state_dict(llama)
    state["model.layers.0.self_attn.W_pack.weight"] = state["model.layers.0.self_attn.W_pack.weight"][:96]
    write_baichuan(llama, tmp_path, state=state, tokenizer=False)
    with pytest.raises(LLMLoadError, match=r"model.layers.0.self_attn.W_pack.weight has shape \(96, 48\), "
                                           r"expected .* = \(144, 48\)"):
        lm(tmp_path)


def test_unknown_model_type_in_folder_needing_remote_code(llama_folder, tmp_path):
    shutil.copy(llama_folder / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "auto_map": {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig"}}))
    with pytest.raises(LLMLoadError, match="model_type='chatglm' is not a transformers model type"):
        lm(tmp_path)


def test_unknown_or_missing_model_type_in_text_config():
    with pytest.raises(LLMLoadError, match="text_config.model_type='llamaa' is not a transformers model type"):
        load_causal_lm({"model_type": "llamaa", "hidden_size": 32})
    with pytest.raises(LLMLoadError, match="needs checkpoint_name_or_path .* or model_type"):
        load_causal_lm({"hidden_size": 32, "seq_length": 64})
    with pytest.raises(LLMLoadError, match="'clip_vision_model' has no causal-LM class"):
        load_causal_lm({"model_type": "clip_vision_model"})
    with pytest.raises(LLMLoadError, match="does not make a llama config"):
        load_causal_lm({"model_type": "llama", "hidden_size": 30, "num_attention_heads": 4})


@pytest.mark.parametrize("change, reason", [
    ({"hidden_size": 5120, "num_hidden_layers": 40, "model_max_length": 4096}, r"Baichuan-13B \(.*\), which uses ALiBi"),
    ({"vocab_size": 125696, "architectures": ["BaichuanForCausalLM"]}, "Baichuan2 .* normalised"),
])
def test_baichuan_variants_that_are_not_llama_are_refused(tmp_path, change, reason):
    (tmp_path / "config.json").write_text(json.dumps({**baichuan_config_json(tiny_llama_config()), **change}))
    with pytest.raises(UnsupportedLLMError, match=reason) as error:
        lm(tmp_path)
    assert isinstance(error.value, NotImplementedError) and isinstance(error.value, WeightLoadError)


def test_checkpoint_missing_a_tensor_is_refused_by_name(llama, tmp_path):
    state = baichuan_state_dict(llama)
    del state["model.norm.weight"]
    write_baichuan(llama, tmp_path, state=state, tokenizer=False)
    with pytest.raises(LLMLoadError, match="1 missing keys: model.norm.weight"):
        lm(tmp_path)


def test_checkpoint_with_a_tensor_of_the_wrong_shape_is_refused(llama, tmp_path):
    state = baichuan_state_dict(llama)
    state["model.norm.weight"] = torch.ones(47)
    write_baichuan(llama, tmp_path, state=state, tokenizer=False)
    with pytest.raises(LLMLoadError, match=r"1 tensors of the wrong shape: model.norm.weight: checkpoint \(47,\) "
                                           r"vs model \(48,\)"):
        lm(tmp_path)


def test_text_config_sizes_must_agree_with_the_folder(baichuan_folder):
    with pytest.raises(LLMLoadError, match=r"hidden_size=4096 \(checkpoint: 48\)"):
        load_causal_lm({"checkpoint_name_or_path": str(baichuan_folder), "hidden_size": 4096})
    with pytest.raises(LLMLoadError, match=r"model_type='llama' \(checkpoint: 'baichuan'\)"):
        load_llm_config({"checkpoint_name_or_path": str(baichuan_folder), "model_type": "llama"})


# ---------------------------------------------------------------------------------------------------- tokenizers


def sentencepiece_ids(folder, text: str) -> list[int]:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


def test_llama_tokenizer_model_gives_sentencepiece_ids_after_bos(llama_folder):
    tokenizer = load_llm_tokenizer(llama_folder)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == [1] + sentencepiece_ids(llama_folder, text)
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_baichuan_tokenizer_adds_no_special_tokens_unless_asked(baichuan_folder):
    tokenizer = load_llm_tokenizer(baichuan_folder)  # its tokenizer_config.json names remote code: not run
    assert isinstance(tokenizer, SentencePieceTokenizer)
    ids = sentencepiece_ids(baichuan_folder, TEXTS[0])
    assert tokenizer(TEXTS[0])["input_ids"] == ids
    with_eos = load_llm_tokenizer(baichuan_folder, add_eos_token=True)
    assert with_eos(TEXTS[0])["input_ids"] == ids + [2]  # the seed's training targets: caption </s>


def test_sentencepiece_tokenizer_pads_on_the_left_with_unk(llama_folder):
    tokenizer = load_llm_tokenizer(llama_folder)
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<unk>", 0, "left")
    batch = tokenizer(["a dog", TEXTS[1]], padding=True, return_tensors="pt")
    short = len(tokenizer("a dog")["input_ids"])
    assert batch["input_ids"][0, -short:].tolist() == tokenizer("a dog")["input_ids"]
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - short) + [1] * short


def test_opt_vocab_and_merges_folder(tmp_path):
    tokenizer = load_llm_tokenizer(write_byte_level_bpe(tmp_path, "opt"))
    assert (tokenizer.pad_token, tokenizer.pad_token_id, tokenizer.padding_side) == ("<pad>", 1, "left")
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert ids[0] == 2  # OPT prepends </s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXTS[0]


def test_gpt2_tokenizer_json_folder_pads_with_its_end_of_text_token(tmp_path):
    tokenizer = load_llm_tokenizer(write_byte_level_bpe(tmp_path, "gpt2", as_tokenizer_json=True))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    assert tokenizer.decode(tokenizer(TEXTS[1])["input_ids"]) == TEXTS[1]


def test_folder_without_tokenizer_files_names_what_was_looked_for(llama_folder, tmp_path):
    shutil.copy(llama_folder / "config.json", tmp_path)
    with pytest.raises(LLMLoadError, match=f"{tmp_path} has no tokenizer files: looked for tokenizer.json, "
                                           "tokenizer.model, vocab.json \\+ merges.txt"):
        load_llm_tokenizer(tmp_path)
    with pytest.raises(LLMLoadError, match="tokenizer folder does not exist"):
        load_llm_tokenizer(tmp_path / "missing")
