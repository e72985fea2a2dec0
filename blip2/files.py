"""Writing our folders without losing anything: the files blip2 owns, the check that an output folder holds nothing
else, and atomic writes.

A save writes only the files named in ``OWN_FILES``, each to a temporary name in the same folder and then moved over
the old one with ``os.replace``, so a crash never leaves a half-written file. Nothing else in the folder is touched:
a folder holding files we did not write is refused (``overwrite=True`` lets the save replace our own files there, and
still deletes nothing), and an output that is a regular file is always refused.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError

logger = logging.getLogger(__name__)

# every file a blip2 save_pretrained writes into a folder
OWN_FILES = frozenset({
    "config.yaml", "model.safetensors",  # the model (weights/loader.py::save_pretrained)
    "preprocessor_config.json", "vocab.txt",  # Blip2ImageProcessor / Blip2Processor
    # an LLM tokenizer's own files (Blip2GenerationProcessor, through transformers' tokenizer save_pretrained)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
})
TEMP_PREFIX = ".blip2-tmp-"  # a file being written; one left by a crash is still ours


class OutputFolderError(FileExistsError, ValueError):
    """An output folder holds files blip2 did not write, or the output is a regular file; nothing was written."""


class OutputWriteError(OSError):
    """Writing a folder failed part-way (disk full, a folder taken away): its files are as they were before."""


def _write_failure(directory: Path, error: BaseException) -> OutputWriteError:
    """One line for a failed write; ENOSPC reads "no space left on device" whichever library raised it."""
    text = " ".join(str(error).split())
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in text or "StorageFull" in text:
        reason = "no space left on device"
    else:
        reason = (error.strerror if isinstance(error, OSError) and error.strerror else text) or type(error).__name__
    return OutputWriteError(f"could not write {directory}: {reason}; the files already there are unchanged")


def foreign_entries(directory: Path) -> list[str]:
    """Names in ``directory`` that a blip2 save did not write (sub-folders included), sorted."""
    return sorted(entry.name for entry in directory.iterdir()
                  if not entry.name.startswith(TEMP_PREFIX) and not (entry.is_file() and entry.name in OWN_FILES))


def check_output_folder(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """Raise ``OutputFolderError`` unless a save may write into ``directory`` (new, empty, or holding only our files;
    with ``overwrite`` also a folder holding other files, which stay as they are). Creates nothing."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise OutputFolderError(
            f"output {directory} is a file, not a folder: refusing to replace it (nothing was written; overwrite only "
            "replaces blip2's own files inside a folder and never deletes anything)"
        )
    if directory.is_dir() and not overwrite:
        foreign = foreign_entries(directory)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise OutputFolderError(
                f"output folder {directory} holds files blip2 did not write ({shown}): refusing to write there; "
                "choose a new or empty folder, or pass overwrite=True (blip2 convert --overwrite) to replace only "
                "blip2's own files and keep the others"
            )
    return directory


def prepare_output_folder(directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """``check_output_folder``, then create the folder (and its parents) when it is new."""
    directory = check_output_folder(directory, overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _temp_path(directory: Path, name: str) -> Path:
    return directory / f"{TEMP_PREFIX}{secrets.token_hex(4)}-{name}"


def write_atomic(path: Path, write: Callable[[Path], object], temp_prefix: str = TEMP_PREFIX) -> None:
    """``write(temp)`` fills a temporary file beside ``path`` (named ``temp_prefix...``), which then replaces
    ``path`` (``os.replace``): a reader, or a run killed midway, never sees half a file."""
    temp = path.with_name(f"{temp_prefix}{secrets.token_hex(4)}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data, temp_prefix: str = TEMP_PREFIX) -> None:
    """``data`` as indented JSON, written with ``write_atomic``."""
    write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=1)), temp_prefix)


def write_files(directory: Path, writers: dict[str, Callable[[Path], None]]) -> None:
    """Write each of our files: ``writers[name](path)`` writes to a temporary path in ``directory``; once all are
    written they replace the old files back to back (``os.replace``). On an error the temporary files are removed
    and the old files stay as they were."""
    unknown = [name for name in writers if name not in OWN_FILES]
    if unknown:
        raise ValueError(f"{', '.join(unknown)} not in blip2.files.OWN_FILES: add them there first")
    staged: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            staged[name] = _temp_path(directory, name)
            write(staged[name])
        for name, temp in staged.items():
            os.replace(temp, directory / name)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own SafetensorError
        if isinstance(error, (OutputFolderError, OutputWriteError)):
            raise
        raise _write_failure(directory, error) from error
    finally:
        for temp in staged.values():
            temp.unlink(missing_ok=True)


def write_folder_files(directory: Path, write: Callable[[Path], object]) -> list[str]:
    """For a writer that makes several files of its own choosing (a transformers tokenizer): ``write(folder)`` fills
    a temporary folder inside ``directory``; its files then replace ours one by one (``os.replace``). A name not in
    ``OWN_FILES`` is added only where no such file exists yet, and logged (a later save sees it as foreign); one that
    exists already is the user's, and raises before anything is moved. Returns the names written."""
    staging = _temp_path(directory, "folder")
    staging.mkdir()
    try:
        write(staging)
        names = sorted(entry.name for entry in staging.iterdir())
        extra = [name for name in names if name not in OWN_FILES]
        clashing = [name for name in extra if (directory / name).exists() or not (staging / name).is_file()]
        if clashing:
            raise OutputFolderError(f"saving into {directory} would replace {', '.join(clashing)}, which blip2 does "
                                    "not own: nothing was written")
        if extra:
            logger.warning("%s: also wrote %s (not in blip2.files.OWN_FILES: a later save into this folder "
                           "needs overwrite=True)", directory, ", ".join(extra))
        for name in names:
            os.replace(staging / name, directory / name)
        return names
    except OSError as error:
        if isinstance(error, (OutputFolderError, OutputWriteError)):
            raise
        raise _write_failure(directory, error) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
