"""Tiny LLM folders written in the test: a Llama saved by transformers, the same weights in Baichuan-7B's layout,
a sentencepiece ``tokenizer.model`` trained on generated captions, and GPT-2/OPT byte-level BPE tokenizer files.

Sizes are odd where they can be (STYLE rule 17): width 48, 4 heads of 12, MLP 37, 2 layers, 300 pieces. Weights are
random and far from their usual initial values so a swapped q/k/v block always shows in the logits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 300
HIDDEN = 48


def captions(count: int = 400, seed: int = 0) -> list[str]:
    """Generated caption-like sentences (digits included, so split digits and byte fallback get used)."""
    rng = random.Random(seed)
    subjects = ["a dog", "the cat", "two men", "a woman", "some birds", "a red car", "the old train", "children"]
    verbs = ["is running on", "sits near", "looks at", "is parked beside", "flies over", "plays with", "waits at"]
    places = ["the beach", "a green field", "the busy street", "a wooden table", "the station", "snowy hills"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}, {rng.randint(0, 99)} times."
            for _ in range(count)]


def train_sentencepiece(path: Path, vocab_size: int = VOCAB) -> Path:
    """A BPE ``tokenizer.model`` set up as Llama's and Baichuan's: <unk>=0 <s>=1 </s>=2, byte fallback, no
    normalisation, whitespace kept, a dummy prefix."""
    from blip2.engine.tasks.stage2 import train_sentencepiece as train

    return train(captions(), path, vocab_size, byte_fallback=True, split_digits=True,
                 normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    sizes = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-6,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaConfig(**{**sizes, **overrides})


@torch.no_grad()
def tiny_llama(seed: int = 0, **overrides):
    """A random LlamaForCausalLM: weights ~N(0, 0.1), RMSNorm weights around 1."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.1
        param.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)
    return model


def write_llama(model, folder: Path, max_shard_size: str | None = None, tokenizer: bool = True) -> Path:
    """transformers' own layout (save_pretrained), optionally sharded, with a Llama-style tokenizer.model."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    if tokenizer:
        train_sentencepiece(Path(folder) / "tokenizer.model")
    return Path(folder)


def baichuan_config_json(config) -> dict:
    """config.json as Baichuan-7B ships it (remote-code auto_map included)."""
    return {
        "architectures": ["BaiChuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
        "model_type": "baichuan",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "hidden_act": "silu", "hidden_size": config.hidden_size, "initializer_range": 0.02,
        "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
        "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "rms_norm_eps": config.rms_norm_eps, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.29.1", "use_cache": True, "vocab_size": config.vocab_size,
    }


def baichuan_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The Llama's weights under Baichuan-7B's names: W_pack = cat(q, k, v), rotary inv_freq stored per layer."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}.self_attn."
        parts = [state.pop(prefix + f"{name}_proj.weight") for name in ("q", "k", "v")]
        state[prefix + "W_pack.weight"] = torch.cat(parts, dim=0)
        state[prefix + "rotary_emb.inv_freq"] = inv_freq.clone()
    if dtype is not None:
        state = {key: value.to(dtype) for key, value in state.items()}
    return state


def write_baichuan(model, folder: Path, fmt: str = "bin", shards: int = 1, dtype: torch.dtype | None = None,
                   state: dict[str, torch.Tensor] | None = None, tokenizer: bool = True) -> Path:
    """A Baichuan-7B folder: config.json, weights as pytorch_model.bin or model.safetensors (sharded with an index
    json when ``shards`` > 1), tokenizer.model and Baichuan's tokenizer_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(baichuan_config_json(model.config), indent=2))
    state = state if state is not None else baichuan_state_dict(model, dtype)
    _write_weights(state, folder, fmt, shards)
    if tokenizer:
        train_sentencepiece(folder / "tokenizer.model")
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaiChuanTokenizer", None]},
            "add_bos_token": False, "add_eos_token": False, "tokenizer_class": "BaiChuanTokenizer",
            "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": {"__type": "AddedToken",
            "content": "</s>"}, "unk_token": {"__type": "AddedToken", "content": "<unk>"},
            "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
        }))
    return folder


def _write_weights(state: dict[str, torch.Tensor], folder: Path, fmt: str, shards: int) -> None:
    base = "pytorch_model" if fmt == "bin" else "model"
    suffix = ".bin" if fmt == "bin" else ".safetensors"
    keys = list(state)
    groups = [keys[index::shards] for index in range(shards)]
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        name = f"{base}{suffix}" if shards == 1 else f"{base}-{index:05d}-of-{shards:05d}{suffix}"
        part = {key: state[key].contiguous() for key in group}
        if fmt == "bin":
            torch.save(part, folder / name)
        else:
            save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in group})
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (folder / f"{base}{suffix}.index.json").write_text(json.dumps(index, indent=2))


def write_byte_level_bpe(folder: Path, model_type: str = "opt", as_tokenizer_json: bool = False) -> Path:
    """A GPT-2/OPT-style tokenizer folder trained on the captions: vocab.json + merges.txt, or one tokenizer.json;
    config.json names ``model_type`` so AutoTokenizer picks the class."""
    from tokenizers import ByteLevelBPETokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"] if model_type == "opt" else ["<|endoftext|>"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions(), vocab_size=VOCAB, min_frequency=1, special_tokens=specials, show_progress=False)
    if as_tokenizer_json:
        bpe.save(str(folder / "tokenizer.json"))
    else:
        bpe.save_model(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": VOCAB}))
    if model_type == "opt":  # as facebook/opt-* ship them: </s> is bos, eos and unk, <pad> pads, bos is prepended
        specials_map = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials_map))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {**specials_map, "add_bos_token": True, "tokenizer_class": "GPT2Tokenizer"}))
    return folder
