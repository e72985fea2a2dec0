"""Shared fixtures: tiny odd-sized configs so a swapped axis shows up as a shape error."""

from __future__ import annotations

import pytest
import torch

from blip2.config import Blip2Config, QformerConfig, ViTConfig


def tiny_config(freeze_vision: bool = True, **overrides) -> Blip2Config:
    vision = ViTConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    qformer = QformerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                            query_length=5, vocab_size=120, max_position_embeddings=40, bos_token_id=119,
                            sep_token_id=102, pad_token_id=0)
    return Blip2Config(vision_config=vision, qformer_config=qformer, embed_dim=24, max_txt_len=16,
                       freeze_vision=freeze_vision, **overrides)


def text_batch(batch: int, length: int, vocab: int = 100, lengths: list[int] | None = None, seed: int = 0):
    """[CLS] w w ... [SEP] [PAD]...: input_ids and attention_mask (B, L)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = lengths or [length] * batch
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    for row, size in enumerate(lengths):
        input_ids[row, 0] = 101
        input_ids[row, 1 : size - 1] = torch.randint(1, vocab, (size - 2,), generator=generator)
        input_ids[row, size - 1] = 102
        attention_mask[row, :size] = 1
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny tensors more
    intra-op threads only add overhead, and a lot of it when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config() -> Blip2Config:
    return tiny_config()
