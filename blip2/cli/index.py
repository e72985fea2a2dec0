"""``blip2 index``: build or update a searchable image index (see ``blip2.engine.index``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Placeholder until the command is written."""


def cmd_index(args: argparse.Namespace) -> int:
    raise NotImplementedError("blip2 index is not written yet")
