"""The one attention module: multi-head self- or cross-attention on ``scaled_dot_product_attention``.

It serves the EVA ViT (fused qkv weight, q and v biases, k bias fixed at zero) and the Q-Former (separate q/k/v
projections; cross-attention keys and values come from the image width). Masks are boolean, True = may attend,
shaped to broadcast against (B, heads, L_query, L_key); None means "attend everywhere", which lets SDPA pick its
fastest kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeyValue = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head attention with an output projection.

    Args:
        hidden_size: width of the queries and of the output.
        num_heads: number of heads; must divide ``hidden_size``.
        kv_size: width of the key/value input for cross-attention (default: ``hidden_size``).
        fused_qkv: one ``qkv`` weight for self-attention (EVA layout) instead of ``q_proj``/``k_proj``/``v_proj``.
        qkv_bias: biases on the projections. With ``fused_qkv`` these are ``q_bias`` and ``v_bias`` only.
        dropout: attention-probability dropout, active in training.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_size: int | None = None,
        fused_qkv: bool = False,
        qkv_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide hidden_size={hidden_size}")
        if fused_qkv and kv_size not in (None, hidden_size):
            raise ValueError("fused_qkv is for self-attention only")
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.fused_qkv = fused_qkv
        kv_size = kv_size or hidden_size
        if fused_qkv:
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
            if qkv_bias:
                self.q_bias = nn.Parameter(torch.zeros(hidden_size))
                self.v_bias = nn.Parameter(torch.zeros(hidden_size))
            else:
                self.register_parameter("q_bias", None)
                self.register_parameter("v_bias", None)
        else:
            self.q_proj = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
            self.k_proj = nn.Linear(kv_size, hidden_size, bias=qkv_bias)
            self.v_proj = nn.Linear(kv_size, hidden_size, bias=qkv_bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, d)

    def _project(self, hidden_states: torch.Tensor, kv_states: torch.Tensor | None):
        if self.fused_qkv:
            bias = None
            if self.q_bias is not None:
                bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
            qkv = F.linear(hidden_states, self.qkv.weight, bias)  # (B, L, 3D)
            return qkv.chunk(3, dim=-1)
        source = hidden_states if kv_states is None else kv_states
        return self.q_proj(hidden_states), self.k_proj(source), self.v_proj(source)

    def forward(
        self,
        hidden_states: torch.Tensor,
        kv_states: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        past_key_value: KeyValue | None = None,
        return_key_value: bool = False,
    ) -> tuple[torch.Tensor, KeyValue | None]:
        """Attend from ``hidden_states`` (B, L, D) to itself, or to ``kv_states`` (B, N, D_kv) for cross-attention.

        ``past_key_value`` (keys, values) of shape (B, H, P, d) are prepended to this call's keys and values; with
        ``return_key_value`` the full (past + current) keys and values come back for reuse.
        """
        query, key, value = self._project(hidden_states, kv_states)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if past_key_value is not None:
            key = torch.cat((past_key_value[0], key), dim=2)
            value = torch.cat((past_key_value[1], value), dim=2)
        context = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, d)
        batch, _, length, _ = context.shape
        context = context.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return self.out_proj(context), ((key, value) if return_key_value else None)
