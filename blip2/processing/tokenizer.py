"""The Q-Former tokenizer: bert-base-uncased WordPiece plus ``[DEC]``, built offline from the shipped vocabulary."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import BertTokenizer

DEFAULT_VOCAB_FILE = Path(__file__).with_name("bert_base_uncased_vocab.txt")
DEC_TOKEN = "[DEC]"  # the bos token of the Q-Former's language-modelling pass (id 30522 with the default vocab)


def load_tokenizer(vocab_file: str | os.PathLike | None = None) -> BertTokenizer:
    """A fast lowercasing BERT tokenizer from ``vocab_file`` (default: bert-base-uncased) with ``[DEC]`` as bos."""
    path = Path(vocab_file) if vocab_file is not None else DEFAULT_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer vocabulary not found: {path}")
    with open(path, encoding="utf-8") as handle:
        vocab = {line.rstrip("\n"): index for index, line in enumerate(handle)}
    # clean_up_tokenization_spaces: decode "man ' s" as "man's", as the transformers 4.x BERT tokenizer LAVIS used did
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512, clean_up_tokenization_spaces=True)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    return tokenizer
