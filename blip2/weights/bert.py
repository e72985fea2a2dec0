"""Initialise a stage-1 Q-Former from a Hugging Face BERT folder, as LAVIS does from ``bert-base-uncased``.

Copied: word embeddings (grown by rows for added tokens such as [DEC]), position embeddings, the embeddings
LayerNorm, each layer's self-attention, and its FFN into both the text FFN and the query FFN (LAVIS starts the query
FFN as a copy). The MLM head's transform and bias go to ``lm_head`` when present. Cross-attention, the query tokens,
the projections and the ITM head keep their fresh initialisation and are listed in the returned report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from blip2.weights.keymap import KeyMap, bert_layer, rename, weight_and_bias
from blip2.weights.loader import LoadReport, WeightLoadError, load_into, read_state_dict

BERT_TO_NATIVE: KeyMap = {
    "embeddings.word_embeddings.weight": "qformer.embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight": "qformer.embeddings.position_embeddings.weight",
    "embeddings.position_ids": None,  # a buffer
    "embeddings.token_type_embeddings.weight": None,  # the Q-Former has no segments (LAVIS ignores it too)
    **weight_and_bias("embeddings.LayerNorm", "qformer.embeddings.layernorm"),
    **bert_layer("encoder.layer.{}", attention="self"),
    **weight_and_bias("pooler.dense", None),
    **weight_and_bias("cls.predictions.transform.dense", "lm_head.dense"),
    **weight_and_bias("cls.predictions.transform.LayerNorm", "lm_head.norm"),
    "cls.predictions.bias": "lm_head.bias",
    **weight_and_bias("cls.predictions.decoder", None),  # tied to the word embeddings
    **weight_and_bias("cls.seq_relationship", None),
}

# what BERT cannot provide; the vision tower is not the Q-Former's business and is left out of the report
FRESH = [
    "query_tokens", "temp", "qformer.layers.*.cross_attn.*", "lm_head.*", "vision_proj.*", "text_proj.*",
    "itm_head.*",
]
_VISION = ("vision_model.", "ln_vision.")
_GROWN_ROWS = {"qformer.embeddings.word_embeddings.weight": "normal", "lm_head.bias": "zeros"}


def _read_bert(bert_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_file = bert_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{bert_dir} is not a BERT folder: no config.json")
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (bert_dir / weights).is_file():
            return json.loads(config_file.read_text(encoding="utf-8")), read_state_dict(bert_dir / weights)
    raise FileNotFoundError(f"{bert_dir} has no model.safetensors or pytorch_model.bin")


def _plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``bert.`` prefix of BertFor* heads; old files name LayerNorm parameters gamma/beta."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("bert.")
        if key.endswith(".gamma") or key.endswith(".beta"):
            key = key.rsplit(".", 1)[0] + (".weight" if key.endswith(".gamma") else ".bias")
        out[key] = value
    return out


def _grow_rows(key: str, value: torch.Tensor, target: torch.Tensor, fill: str) -> torch.Tensor:
    """Append rows for tokens BERT lacks: embeddings drawn from normal(0, 0.02) (BERT's init), biases zero."""
    if value.shape[1:] != target.shape[1:] or value.shape[0] > target.shape[0]:
        raise WeightLoadError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target.shape)}")
    extra = (target.shape[0] - value.shape[0],) + tuple(value.shape[1:])
    rows = torch.randn(extra, dtype=value.dtype) * 0.02 if fill == "normal" else torch.zeros(extra, dtype=value.dtype)
    return torch.cat((value, rows))


def _copy_text_ffn_to_query_ffn(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BERT has one FFN per layer; LAVIS starts the query FFN as a copy of it."""
    copies = {key.replace(".text_ffn.", ".query_ffn."): value for key, value in state.items() if ".text_ffn." in key}
    return {**state, **copies}


def init_qformer_from_bert(model, bert_dir: str | os.PathLike) -> LoadReport:
    """Copy BERT into ``model``'s Q-Former; the report's ``missing`` lists the freshly initialised keys."""
    bert_dir = Path(bert_dir)
    bert_config, source = _read_bert(bert_dir)
    # shapes cannot catch these: a head count or activation that differs would silently change the computation
    needed = {"num_attention_heads": model.config.qformer_config.num_attention_heads, "hidden_act": "gelu"}
    for key, ours in needed.items():
        if bert_config.get(key) != ours:
            raise WeightLoadError(f"{bert_dir}: BERT {key}={bert_config.get(key)!r} but the Q-Former has {ours!r}")
    state, dropped = rename(_plain_names(source), BERT_TO_NATIVE)
    state = _copy_text_ffn_to_query_ffn(state)
    expected = model.state_dict()
    for key, fill in _GROWN_ROWS.items():
        if key in state:
            state[key] = _grow_rows(key, state[key], expected[key], fill)
    report = load_into(
        model, state, source=str(bert_dir), allowed_missing=FRESH + [f"{prefix}*" for prefix in _VISION],
        dropped=dropped,
    )
    report.missing = [key for key in report.missing if not key.startswith(_VISION)]
    return report
