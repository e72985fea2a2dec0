"""``blip2 serve``: the model over HTTP with a web page (see ``blip2.serve``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Placeholder until the command is written."""


def cmd_serve(args: argparse.Namespace) -> int:
    raise NotImplementedError("blip2 serve is not written yet")
