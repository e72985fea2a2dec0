"""The files of an image index folder (see ``blip2.engine.index`` for the layout): the header ``index.json``, the
append-only parts, and the replay of the parts into the live rows.

Every file is written to a temporary name (``blip2.files.TEMP_PREFIX``) and renamed; a part's ``.json`` is written
after its tensors, so its presence marks the part done.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip2.files import TEMP_PREFIX, write_atomic, write_json_atomic

FORMAT = "blip2-image-index"
VERSION = 1
HEADER = "index.json"
FEATURE_KEY = "image_feats"
ANN_FILE = "ann.faiss"
PART_NAME = re.compile(r"part-(\d{5})\.(json|safetensors)")
KINDS = ("queries", "pooled")


def part_files(part: str) -> tuple[str, str]:
    """The tensor file and the record file of part ``part`` (e.g. "part-00003")."""
    return f"{part}.safetensors", f"{part}.json"


def part_name(number: int) -> str:
    return f"part-{number:05d}"


def is_own_file(name: str) -> bool:
    """Whether ``name`` is a file an index build writes (a left-over temporary file included)."""
    return name in (HEADER, ANN_FILE) or name.startswith(TEMP_PREFIX) or PART_NAME.fullmatch(name) is not None


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {path} is not valid JSON ({error})") from error


def check_index_folder(folder: Path) -> None:
    """Refuse an output that is a file, or a folder holding files an index build did not write."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"index output {folder} is a file, not a folder")
    if folder.is_dir():
        foreign = sorted(entry.name for entry in folder.iterdir() if not (entry.is_file() and is_own_file(entry.name)))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f", ... (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise FileExistsError(f"index output {folder} holds files an index did not write ({shown}): choose a new "
                                  "or empty folder")


def done_parts(folder: Path) -> list[str]:
    """The parts whose record is on disk (done), in order; their numbers must run 0, 1, 2, ..."""
    numbers = sorted(int(match.group(1)) for entry in folder.iterdir()
                     if (match := PART_NAME.fullmatch(entry.name)) and match.group(2) == "json")
    if numbers != list(range(len(numbers))):
        raise ValueError(f"index {folder}: parts {numbers} are not numbered 0..{len(numbers) - 1} (a part is missing)")
    return [part_name(number) for number in numbers]


def write_part(folder: Path, part: str, feats: torch.Tensor | None, record: dict[str, Any]) -> None:
    """The part's tensors (when it has rows), then its record: from then on the part counts as done."""
    tensor_file, record_file = part_files(part)
    if feats is not None and len(feats):
        write_atomic(folder / tensor_file, lambda temp: save_file({FEATURE_KEY: feats.contiguous()}, str(temp)))
    write_json_atomic(folder / record_file, {"part": part, **record})


def read_part_record(folder: Path, part: str) -> dict[str, Any]:
    record = read_json(folder / part_files(part)[1], "index part")
    for key in ("ids", "paths", "stats", "unreadable", "removed"):
        if key not in record:
            raise ValueError(f"index part {folder / part_files(part)[1]} has no {key!r}: not an index part")
    return record


def read_part_feats(folder: Path, part: str, record: dict[str, Any]) -> torch.Tensor | None:
    if not record["ids"]:
        return None
    path = folder / part_files(part)[0]
    if not path.is_file():
        raise FileNotFoundError(f"index part {path} is missing (its record {part_files(part)[1]} is there)")
    try:
        feats = load_file(str(path))[FEATURE_KEY]
    except (SafetensorError, KeyError) as error:
        raise ValueError(f"index part {path} cannot be read ({error}): rebuild the index") from error
    if len(feats) != len(record["ids"]):
        raise ValueError(f"index part {path} holds {len(feats)} rows, its record {len(record['ids'])}")
    return feats


@dataclass
class Replay:
    """The state the parts add up to: the live row of each id, and the images known to be unreadable."""

    live: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (part number, row in the part)
    paths: dict[str, str] = field(default_factory=dict)
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)  # of the live and the unreadable images
    unreadable: set[str] = field(default_factory=set)

    def apply(self, number: int, record: dict[str, Any]) -> None:
        """Part ``number``: drop its removed ids, mark its unreadable ones, then its rows replace older ones."""
        for image_id in record["removed"]:
            self.live.pop(image_id, None)
            self.unreadable.discard(image_id)
            self.stats.pop(image_id, None)
        for image_id, path, stat in record["unreadable"]:
            self.live.pop(image_id, None)
            self.unreadable.add(image_id)
            self.paths[image_id], self.stats[image_id] = path, tuple(stat)
        for row, (image_id, path, stat) in enumerate(zip(record["ids"], record["paths"], record["stats"])):
            self.live[image_id] = (number, row)
            self.unreadable.discard(image_id)
            self.paths[image_id], self.stats[image_id] = path, tuple(stat)

    def live_ids(self) -> list[str]:
        """The live ids in (part, row) order: the row order of a loaded index."""
        return sorted(self.live, key=self.live.__getitem__)


def replay(records: list[dict[str, Any]]) -> Replay:
    state = Replay()
    for number, record in enumerate(records):
        state.apply(number, record)
    return state


def header(model_name: str, fingerprint: str, kind: str, num_queries: int, dim: int, sources: list[str],
           parts: list[str], count: int, ann: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "model": model_name, "model_fingerprint": fingerprint,
            "kind": kind, "num_queries": num_queries, "dim": dim, "sources": sources, "parts": parts,
            "count": count, "ann": ann}


def read_header(folder: Path) -> dict[str, Any]:
    """``index.json`` of an index folder, checked; FileNotFoundError / ValueError naming the problem."""
    if not folder.exists():
        raise FileNotFoundError(f"index folder {folder} does not exist (build it with blip2 index)")
    if not folder.is_dir():
        raise NotADirectoryError(f"index {folder} is not a folder")
    path = folder / HEADER
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an image index: it has no {HEADER} (build it with blip2 index)")
    data = read_json(path, "index header")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a blip2 image index header (format {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"{path} has index format version {data.get('version')}; this blip2 reads {VERSION}")
    if data.get("kind") not in KINDS:
        raise ValueError(f"{path}: kind {data.get('kind')!r} is not one of {', '.join(KINDS)}")
    return data
