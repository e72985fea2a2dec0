"""A small causal LM taught the language of a caption set, then saved as an ordinary LLM folder.

Stage 2 needs a frozen LLM that already speaks; no pretrained weights can be downloaded here, so the demo makes one:
a sentencepiece BPE tokenizer trained on the captions (Llama's layout: <unk>=0, <s>=1, </s>=2) and a tiny
``LlamaForCausalLM`` trained for a few hundred steps. The folder reads back through ``blip2.llm.load_causal_lm`` /
``load_llm_tokenizer`` like any Llama folder.

What BLIP-2 relies on in a real LLM is that it reads its context: the projected queries are a soft prompt, and the LLM
turns what they say into a sentence. A tiny LM trained only on ``<s> caption </s>`` never saw a context, so stage 2
cannot lean on one. So half of the training sequences here are ``[a bag of the caption's word pieces, shuffled] <s>
caption </s>`` (the loss on the caption only): the LM learns to write a caption that uses the words before it, the
in-context skill a pretrained LLM brings, which the queries then learn to address in stage 2.
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


def train_sentencepiece(texts: Sequence[str], path: str | os.PathLike, vocab_size: int = 256,
                        **trainer_options) -> Path:
    """A BPE ``tokenizer.model`` over ``texts`` with Llama's special ids; ``trainer_options`` go to
    sentencepiece's trainer (default: no byte fallback, for a small vocabulary)."""
    import sentencepiece as spm

    path = Path(path)
    options = dict(model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                   character_coverage=1.0, num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as scratch:
        prefix = str(Path(scratch) / "sp")
        spm.SentencePieceTrainer.train(sentence_iterator=iter(list(texts)), model_prefix=prefix,
                                       **{**options, **trainer_options})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(Path(prefix + ".model").read_bytes())
    return path


def train_caption_llm(texts: Sequence[str], out_dir: str | os.PathLike, steps: int = 300, batch_size: int = 64,
                      hidden_size: int = 128, num_layers: int = 2, vocab_size: int = 256, learning_rate: float = 3e-3,
                      seed: int = 0, context_fraction: float = 0.5, max_context: int = 12) -> dict[str, float]:
    """Train the tokenizer and a tiny Llama on ``texts`` and save both in ``out_dir``; return the first/last loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blip2.data.collate import pad_token_rows
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
        rows = [training_row(tokenizer, rng.choice(texts), rng, context_fraction, max_context)
                for _ in range(batch_size)]
        input_ids, mask, labels = pad_token_rows(rows, tokenizer.pad_token_id)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval().save_pretrained(out)
    logger.info("caption LM: loss %.3f -> %.3f in %d steps; saved to %s", losses[0], losses[-1], steps, out)
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}


def training_row(tokenizer, text: str, rng: random.Random, context_fraction: float,
                 max_context: int) -> tuple[list[int], list[int]]:
    """(ids, labels) for ``[context] <s> text </s>``; the context, when drawn, is up to ``max_context`` of the text's
    own word pieces in random order, and is never a target."""
    caption = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]  # <s> text </s>
    context: list[int] = []
    if rng.random() < context_fraction:
        pieces = list(dict.fromkeys(caption[1:-1]))
        rng.shuffle(pieces)
        context = pieces[:max_context]
    return context + caption, [-100] * (len(context) + 1) + caption[1:]

