"""A small causal LM taught the language of a caption set, then saved as an ordinary LLM folder.

Stage 2 needs a frozen LLM that already speaks; no pretrained weights can be downloaded here, so the demo makes one:
a sentencepiece BPE tokenizer trained on the captions (Llama's layout: <unk>=0, <s>=1, </s>=2) and a tiny
``LlamaForCausalLM`` trained on ``<s> caption </s>`` for a few hundred steps. The folder reads back through
``blip2.llm.load_causal_lm`` / ``load_llm_tokenizer`` like any Llama folder.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Sequence

import torch

logger = logging.getLogger("blip2")


def train_sentencepiece(texts: Sequence[str], path: str | os.PathLike, vocab_size: int = 256) -> Path:
    """A BPE ``tokenizer.model`` over ``texts`` with Llama's special ids (no byte fallback: a small vocabulary)."""
    import sentencepiece as spm

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = str(Path(scratch) / "sp")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(list(texts)), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
            num_threads=1, minloglevel=2,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Path(prefix + ".model").read_bytes())
    return path


def train_caption_llm(texts: Sequence[str], out_dir: str | os.PathLike, steps: int = 300, batch_size: int = 64,
                      hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 256, learning_rate: float = 3e-3,
                      seed: int = 0) -> dict[str, float]:
    """Train the tokenizer and a tiny Llama on ``texts`` and save both in ``out_dir``; return the first/last loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blip2.llm import load_llm_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece(texts, out / "tokenizer.model", vocab_size=vocab_size)
    tokenizer = load_llm_tokenizer(out)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    for _ in range(steps):
        batch = [rng.choice(texts) for _ in range(batch_size)]
        encoded = tokenizer(batch, padding="longest", padding_side="right", return_tensors="pt")
        eos = torch.full((len(batch), 1), tokenizer.eos_token_id)
        input_ids = torch.cat((encoded["input_ids"], eos), dim=1)
        mask = torch.cat((encoded["attention_mask"], torch.zeros_like(eos)), dim=1)
        lengths = mask.sum(1)
        input_ids[torch.arange(len(batch)), lengths] = tokenizer.eos_token_id  # EOS right after each caption
        mask[torch.arange(len(batch)), lengths] = 1
        labels = input_ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval().save_pretrained(out)
    logger.info("caption LM: loss %.3f -> %.3f in %d steps; saved to %s", losses[0], losses[-1], steps, out)
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}
