"""Caption and question cleaning, exactly as LAVIS ``blip_caption`` and ``blip_question``."""

from __future__ import annotations

import re

_PUNCTUATION = re.compile(r"([.!\"()*#:;~])")  # commas, "?", "'" and "-" are kept, as in LAVIS
_SPACES = re.compile(r"\s{2,}")


def _truncate(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def clean_caption(caption: str, max_words: int = 50, prompt: str = "") -> str:
    """Lowercase, punctuation to spaces, runs of whitespace to one space, trim, first ``max_words`` words."""
    caption = _SPACES.sub(" ", _PUNCTUATION.sub(" ", caption.lower()))
    # LAVIS quirk kept on purpose: a single inner newline survives and splits no words
    caption = caption.rstrip("\n").strip(" ")
    return prompt + _truncate(caption, max_words)


def clean_question(question: str, max_words: int = 50) -> str:
    """Lowercase, punctuation deleted (not replaced), trailing spaces removed, first ``max_words`` words."""
    return _truncate(_PUNCTUATION.sub("", question.lower()).rstrip(" "), max_words)


class CaptionTransform:
    """``clean_caption`` with a fixed prompt and word limit (the seed's caption transform)."""

    def __init__(self, prompt: str = "", max_words: int = 50) -> None:
        self.prompt = prompt
        self.max_words = max_words

    def __call__(self, caption: str) -> str:
        return clean_caption(caption, self.max_words, self.prompt)
