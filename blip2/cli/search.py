"""``blip2 search``: rank an index's images by a text query (see ``blip2.engine.index``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Placeholder until the command is written."""


def cmd_search(args: argparse.Namespace) -> int:
    raise NotImplementedError("blip2 search is not written yet")
