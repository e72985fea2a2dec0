"""The demo's caption LM reads its context: the skill stage 2 borrows from a pretrained LLM.

Stage 2 can only teach the queries to say "red" if the frozen LM copies a colour it finds before ``<s>``; an LM that
ignores its context guesses colours from its prior whatever the soft prompt says (the demo's first stage-2 runs named
the right colour for 28% of the images with a 300-step LM that had not learned to copy colours yet).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from blip2.data.shapes import COLOURS, SHAPES
from blip2.cli.demo import train_caption_llm
from blip2.engine.tasks.stage2 import training_row
from blip2.processing.llm_tokenizer import load_llm_tokenizer
from blip2.processing.text import clean_caption
from tests.helpers import shapes_data


def next_word_accuracy(lm, tokenizer, records, words, field: str, with_context: bool) -> float:
    """How often the LM, teacher-forced on a caption, ranks the right ``field`` word first among ``words`` at the
    place the caption names it; with_context puts the caption's own shuffled pieces before ``<s>``."""
    first_piece = {word: tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in words}
    assert len(set(first_piece.values())) == len(words), f"{words} do not start with distinct pieces: {first_piece}"
    rng = random.Random(0)
    hits = total = 0
    for record in records:
        caption = clean_caption(record["caption"])
        ids, labels = training_row(tokenizer, caption, rng, context_fraction=1.0 if with_context else 0.0,
                                   max_context=12)
        target = first_piece[record[field]]
        place = next(i for i, label in enumerate(labels) if label == target)  # logits at place - 1 predict it
        with torch.no_grad():
            logits = lm(torch.tensor([ids])).logits[0, place - 1]
        best = max(words, key=lambda word: logits[first_piece[word]].item())
        hits += best == record[field]
        total += 1
    return hits / total


@pytest.mark.slow  # the module fixture trains the caption LM (~25 s)
@pytest.mark.parametrize("field,words", [("colour", list(COLOURS)), ("shape", list(SHAPES))])
def test_caption_lm_copies_colour_and_shape_from_its_context(caption_lm, field, words):
    lm, tokenizer, records = caption_lm
    with_context = next_word_accuracy(lm, tokenizer, records, words, field, with_context=True)
    without = next_word_accuracy(lm, tokenizer, records, words, field, with_context=False)
    assert with_context >= 0.9, f"{field} named from the context for {with_context:.0%} of held-out captions"
    assert without <= 0.5, f"{field} guessed without a context for {without:.0%}: the test cannot tell copying"


@pytest.fixture(scope="module")
def caption_lm(tmp_path_factory):
    """The demo's caption LM recipe on a generated training set; held-out captions to score it on."""
    root = tmp_path_factory.mktemp("caption_lm")
    data = shapes_data(root / "shapes", num_train=600, num_test=40, captions_per_image=3, images_per_class=1)
    texts = [clean_caption(r["caption"]) for r in json.loads((data.root / data.train_annotation).read_text())]
    folder = train_caption_llm(texts, root / "llm", steps=600)["folder"]
    tests = json.loads((data.root / data.test_annotation).read_text())
    records = [{**record, "caption": caption} for record in tests for caption in record["caption"]]
    lm = AutoModelForCausalLM.from_pretrained(folder).eval()
    return lm, load_llm_tokenizer(folder), records
