"""What a run may do with its output folder: check it can be written before any work, and trim its own log."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and prove a file can be written there; one-line ``OSError`` otherwise, raised
    before hours of training or evaluation rather than after."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"output_dir {directory} is a file, not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise PermissionError(f"output_dir {directory} is not writable ({reason})") from None
    return directory


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the records after ``step`` from a JSON-lines training log (written by an interrupted run that is now
    resumed from ``step``), so every step appears once."""
    if not log_path.is_file():
        return
    lines = log_path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
