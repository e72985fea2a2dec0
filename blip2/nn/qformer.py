"""Q-Former: a BERT encoder whose learned queries cross-attend to the image (LAVIS semantics).

Text tokens get word + position embeddings; queries get none. ``[queries; text]`` share one LayerNorm and one
self-attention. Only query positions cross-attend to the image, and only in layers ``i % cross_attention_freq == 0``.
Queries and text have separate feed-forward networks. Residual blocks are post-norm (BERT).

Masks: bidirectional over ``[queries; text]`` (ITC/ITM), or causal over the text with every query visible (LM).
The query pass's self-attention keys and values can be kept (``use_cache``) and handed to a later text-only pass
as ``past_key_values``: that is how the LM loss and caption decoding see the queries without recomputing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2.config import QformerConfig
from blip2.nn.attention import Attention, KeyValue


@dataclass
class QformerOutput:
    last_hidden_state: torch.Tensor  # (B, Q + L, D)
    past_key_values: tuple[KeyValue, ...] | None = None  # per layer, (B, H, P + Q + L, d)


class QformerEmbeddings(nn.Module):
    """Word + position embeddings for text; queries pass through as they are; then LayerNorm and dropout."""

    def __init__(self, config: QformerConfig, with_text: bool = True) -> None:
        super().__init__()
        if with_text:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.word_embeddings = None
            self.position_embeddings = None
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            if self.word_embeddings is None:
                raise ValueError("this Q-Former was built without its text embeddings (stage 2); it takes queries only")
            length = input_ids.shape[1]
            positions = torch.arange(position_offset, position_offset + length, device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)  # (B, L, D)
            parts.append(text.to(query_embeds.dtype) if query_embeds is not None else text)
        if not parts:
            raise ValueError("the Q-Former needs query_embeds, input_ids or both")
        embeddings = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return self.dropout(self.layernorm(embeddings))


class ResidualNorm(nn.Module):
    """BERT's post-norm residual: LayerNorm(input + dropout(dense(hidden)))."""

    def __init__(self, in_size: int, hidden_size: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(residual + self.dropout(self.dense(hidden_states)))


class FeedForward(nn.Module):
    """dense -> GELU -> (dense + dropout + residual + LayerNorm)."""

    def __init__(self, config: QformerConfig) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.output = ResidualNorm(
            config.intermediate_size, config.hidden_size, config.layer_norm_eps, config.hidden_dropout_prob
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.intermediate(hidden_states)), hidden_states)


class AttentionBlock(nn.Module):
    """Attention whose output projection is followed by dropout, the residual and LayerNorm (post-norm)."""

    def __init__(self, config: QformerConfig, kv_size: int | None = None) -> None:
        super().__init__()
        self.attn = Attention(
            config.hidden_size, config.num_attention_heads, kv_size=kv_size,
            dropout=config.attention_probs_dropout_prob,
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states, kv_states=None, attn_mask=None, past_key_value=None, return_key_value=False):
        attn_out, present = self.attn(
            hidden_states, kv_states=kv_states, attn_mask=attn_mask,
            past_key_value=past_key_value, return_key_value=return_key_value,
        )
        return self.norm(hidden_states + self.dropout(attn_out)), present


class QformerLayer(nn.Module):
    def __init__(self, config: QformerConfig, image_hidden_size: int, has_cross_attention: bool, with_text: bool) -> None:
        super().__init__()
        self.self_attn = AttentionBlock(config)
        self.cross_attn = AttentionBlock(config, kv_size=image_hidden_size) if has_cross_attention else None
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config) if with_text else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        query_length: int,
        attn_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        past_key_value: KeyValue | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, KeyValue | None]:
        hidden_states, present = self.self_attn(
            hidden_states, attn_mask=attn_mask, past_key_value=past_key_value, return_key_value=use_cache
        )
        if query_length == 0:
            return self._text_ffn(hidden_states), present
        queries = hidden_states[:, :query_length]  # (B, Q, D)
        if self.cross_attn is not None:
            if image_embeds is None:
                raise ValueError("query positions need image_embeds for cross-attention")
            queries, _ = self.cross_attn(queries, kv_states=image_embeds)
        queries = self.query_ffn(queries)
        if hidden_states.shape[1] == query_length:
            return queries, present
        text = self._text_ffn(hidden_states[:, query_length:])  # (B, L, D)
        return torch.cat((queries, text), dim=1), present

    def _text_ffn(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.text_ffn is None:
            raise ValueError("this Q-Former was built without its text feed-forward networks (stage 2)")
        return self.text_ffn(hidden_states)


def build_attention_mask(
    batch_size: int,
    query_length: int,
    text_mask: torch.Tensor | None,
    past_length: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, Q + L, P + Q + L), True = may attend; None when every position may see every other.

    Past positions (cached queries and, while decoding, earlier text) and queries are never padding. In causal mode
    query rows see only queries (UniLM); text rows see all past and query positions plus earlier text.
    """
    text_length = 0 if text_mask is None else text_mask.shape[1]
    rows = query_length + text_length
    key_length = past_length + rows
    # checking for padding reads the mask back to the host: only worth it on CPU; accelerators take the mask as is
    has_padding = text_mask is not None and (text_mask.device.type != "cpu" or not bool(text_mask.all()))
    if not causal or text_length <= 1 and query_length == 0:
        if not has_padding:
            return None
        key_valid = torch.ones(batch_size, key_length, dtype=torch.bool, device=device)
        key_valid[:, past_length + query_length:] = text_mask.bool()
        return key_valid[:, None, None, :]
    mask = torch.ones(rows, key_length, dtype=torch.bool, device=device)
    text_start = past_length + query_length
    if text_length:
        mask[query_length:, text_start:] = torch.tril(
            torch.ones(text_length, text_length, dtype=torch.bool, device=device)
        )
        mask[:query_length, text_start:] = False  # queries never see the text
    mask = mask[None, None].expand(batch_size, 1, rows, key_length)
    if has_padding:
        key_valid = torch.ones(batch_size, key_length, dtype=torch.bool, device=device)
        key_valid[:, text_start:] = text_mask.bool()
        mask = mask & key_valid[:, None, None, :]
    return mask


class Qformer(nn.Module):
    """The Q-Former encoder. ``with_text=False`` builds the query path alone (stage 2 drops the text parts)."""

    def __init__(self, config: QformerConfig, image_hidden_size: int, with_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.with_text = with_text
        self.embeddings = QformerEmbeddings(config, with_text=with_text)
        self.layers = nn.ModuleList(
            QformerLayer(config, image_hidden_size, config.has_cross_attention(index), with_text)
            for index in range(config.num_hidden_layers)
        )

    def cross_attention_blocks(self) -> list[AttentionBlock]:
        """The blocks where the queries attend to the image, in layer order."""
        return [layer.cross_attn for layer in self.layers if layer.cross_attn is not None]

    def forward(
        self,
        query_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        causal: bool = False,
        past_key_values: tuple[KeyValue, ...] | None = None,
        use_cache: bool = False,
        position_offset: int = 0,
    ) -> QformerOutput:
        """Run ``[query_embeds (B, Q, D); text (B, L)]``.

        ``attention_mask`` (B, L) marks real text tokens (1) and padding (0); queries and past positions are always
        real. ``image_embeds`` (B, N, D_img) feed the cross-attention of query positions. ``position_offset`` is the
        first text position (the number of text tokens already in ``past_key_values`` while decoding).
        """
        hidden_states = self.embeddings(input_ids, query_embeds, position_offset)  # (B, Q + L, D)
        query_length = 0 if query_embeds is None else query_embeds.shape[1]
        text_mask = None
        if input_ids is not None:
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        past_length = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        attn_mask = build_attention_mask(
            hidden_states.shape[0], query_length, text_mask, past_length, causal, hidden_states.device
        )
        if image_embeds is not None:
            image_embeds = image_embeds.to(hidden_states.dtype)
        presents = [] if use_cache else None
        for index, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[index]
            hidden_states, present = layer(hidden_states, query_length, attn_mask, image_embeds, past, use_cache)
            if presents is not None:
                presents.append(present)
        return QformerOutput(hidden_states, tuple(presents) if presents is not None else None)


class QformerLMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> logits over the vocabulary, decoder tied to the word embeddings."""

    def __init__(self, config: QformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        hidden_states = self.norm(F.gelu(self.dense(hidden_states)))
        return F.linear(hidden_states, word_embeddings, self.bias)  # (B, L, V)
