"""Tiny odd-sized BLIP-2 models built with transformers' classes, and the LAVIS layout written from the references.

Sizes follow STYLE rule 17: ViT width 36, MLP 37, image 30, patch 6; Q-Former width 32, 3 layers (cross-attention on
0 and 2), 4 heads, FFN 37, 5 queries, vocabulary 99, 20 positions. Weights are random and far from their usual
initial values so a misplaced tensor always shows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

VOCAB = 99
MAX_POSITIONS = 20
NUM_QUERIES = 5
LAVIS_DROPPED = [
    "Qformer.bert.embeddings.position_ids",
    "Qformer.cls.predictions.decoder.bias",
    "Qformer.cls.predictions.decoder.weight",
]


def hf_configs(text_input: bool = True):
    """(vision, qformer) kwargs for transformers' Blip2Config."""
    vision = dict(hidden_size=36, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30,
                  patch_size=6, layer_norm_eps=1e-4)
    qformer = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                   max_position_embeddings=MAX_POSITIONS, use_qformer_text_input=text_input)
    return vision, qformer


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (LayerNorm weights around 1); the ViT's fused k-bias slice stays zero, as in EVA."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator) * 0.1
            param.copy_(noise + 1.0 if isinstance(module, torch.nn.LayerNorm) and name == "weight" else noise)
    for name, param in model.named_parameters():
        if name.endswith("self_attn.qkv.bias"):
            param.chunk(3)[1].zero_()
    return model.eval()


def build_hf_retrieval():
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision, qformer = hf_configs(text_input=True)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=NUM_QUERIES,
                         image_text_hidden_size=16, image_token_index=None)
    return randomize_(Blip2ForImageTextRetrieval(config))


def build_hf_generation(vocab_size: int = VOCAB, image_token_index: int = VOCAB - 2):
    """A random Blip2ForConditionalGeneration with a one-layer OPT (bos 2, pad 1, eos 2) of ``vocab_size`` words."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    vision, qformer = hf_configs(text_input=False)
    text = OPTConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, ffn_dim=37, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=16)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(),
                         num_query_tokens=NUM_QUERIES, image_token_index=image_token_index)
    return randomize_(Blip2ForConditionalGeneration(config), seed=1)


def text_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.randint(1, VOCAB, (len(lengths), length), generator=generator)
    attention_mask = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask


def pixels(batch: int, size: int = 30, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_reference(hf, pixel_values, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Blip2ForImageTextRetrieval's ITC similarity and ITM logits computed from its submodules, with
    ``interpolate_pos_encoding=True`` (its forward does not take that argument)."""
    image_embeds = hf.vision_model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
    queries = hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_out = hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
    image_feats = F.normalize(hf.vision_projection(query_out), dim=-1)  # (B, Q, E)
    text_out = hf.qformer(query_embeds=hf.embeddings(input_ids=input_ids), query_length=0,
                          attention_mask=attention_mask).last_hidden_state
    text_feat = F.normalize(hf.text_projection(text_out[:, 0]), dim=-1)  # (B, E)
    itc = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1)
    joint_mask = torch.cat((torch.ones(queries.shape[:2], dtype=attention_mask.dtype), attention_mask), dim=1)
    joint = hf.qformer(query_embeds=hf.embeddings(input_ids=input_ids, query_embeds=queries),
                       query_length=queries.shape[1], attention_mask=joint_mask,
                       encoder_hidden_states=image_embeds).last_hidden_state
    itm = hf.itm_head(joint[:, : queries.shape[1]]).mean(dim=1)
    return itc, itm


def hf_to_lavis(hf_state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """A LAVIS stage-1 state dict from a retrieval model's tensors, written independently of blip2.weights.

    Names follow the LAVIS listing in reference/lavis_blip2.md §1-2 and the inverse of transformers' conversion
    rules (transformers_blip2.md §2.2). LAVIS-only tensors (temp, the Q-Former LM head) are random; the tied
    decoder and the position-id buffer are what LAVIS saves.
    """
    renames = [
        ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
        ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
        ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
        ("vision_model.post_layernorm", "ln_vision"),
        ("vision_model.encoder.layers", "visual_encoder.blocks"),
        ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
        ("self_attn.qkv", "attn.qkv"), ("self_attn.projection", "attn.proj"),
        ("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm"),
        ("embeddings.word_embeddings", "Qformer.bert.embeddings.word_embeddings"),
        ("embeddings.position_embeddings", "Qformer.bert.embeddings.position_embeddings"),
        ("qformer.encoder", "Qformer.bert.encoder"),
        ("attention.attention", "attention.self"),
        ("vision_projection", "vision_proj"), ("text_projection", "text_proj"),
    ]
    lavis = {}
    for key, value in hf_state.items():
        for old, new in renames:
            key = key.replace(old, new, 1)
        if key.endswith("attn.qkv.bias"):
            q_bias, _, v_bias = value.chunk(3)
            lavis[key.replace("qkv.bias", "q_bias")] = q_bias.clone()
            lavis[key.replace("qkv.bias", "v_bias")] = v_bias.clone()
        else:
            lavis[key] = value.clone()
    generator = torch.Generator().manual_seed(seed)
    hidden = hf_state["query_tokens"].shape[-1]
    for name, shape in (("transform.dense.weight", (hidden, hidden)), ("transform.dense.bias", (hidden,)),
                        ("transform.LayerNorm.weight", (hidden,)), ("transform.LayerNorm.bias", (hidden,)),
                        ("bias", (VOCAB,))):
        lavis[f"Qformer.cls.predictions.{name}"] = torch.randn(shape, generator=generator)
    lavis["Qformer.cls.predictions.decoder.weight"] = lavis["Qformer.bert.embeddings.word_embeddings.weight"]
    lavis["Qformer.cls.predictions.decoder.bias"] = lavis["Qformer.cls.predictions.bias"]
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(MAX_POSITIONS).expand(1, -1)
    lavis["temp"] = torch.tensor(0.05)
    return lavis


def saved_stage1(config, tmp_path_factory, name: str):
    """(a stage-1 model drawn with seed 0, the folder it was saved to)."""
    from blip2 import Blip2Qformer

    torch.manual_seed(0)
    model = Blip2Qformer(config)
    folder = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(folder)
    return model, folder


def save_torch(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path
