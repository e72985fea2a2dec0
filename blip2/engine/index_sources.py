"""What ``blip2 index`` reads: the images of a folder (recursively, by suffix), of webdataset tar shards, or both,
each with an id, a path and the size and modification time that tell a changed file from an unchanged one.

A tar member's path is ``"<absolute tar path>#<member name>"`` and its id ``"<tar id>#<member name>"``; its size and
time are the tar's, so a rewritten tar has all its members embedded again.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from blip2.engine.extract import IMAGE_SUFFIXES
from blip2.processing.image import ImageLoadError, load_image

TAR_SUFFIX = ".tar"
MEMBER_SEPARATOR = "#"


@dataclass(frozen=True)
class SourceImage:
    id: str  # the path relative to the source root (a tar member: "<tar id>#<member>")
    path: str  # the absolute file path (a tar member: "<absolute tar path>#<member>")
    stat: tuple[int, int]  # (size in bytes, mtime in ns) of the file (of the tar for a member)


def source_paths(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The sources as absolute paths, sorted: a folder, a ``.tar`` shard, or several of them."""
    given = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not given:
        raise ValueError("no image source given: pass a folder of images or of .tar shards, or .tar files")
    paths = []
    for item in given:
        path = Path(item).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"image source {item} does not exist")
        if path.is_file() and path.suffix.lower() != TAR_SUFFIX:
            raise ValueError(f"image source {item} is a file but not a .tar shard: pass its folder instead")
        paths.append(path)
    return sorted(set(paths))


def source_root(sources: Sequence[Path]) -> Path:
    """The folder ids are relative to: the source itself for one folder, else the common parent."""
    if len(sources) == 1 and sources[0].is_dir():
        return sources[0]
    return Path(os.path.commonpath([path if path.is_dir() else path.parent for path in sources]))


def file_stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def tar_images(tar_path: Path, tar_id: str) -> list[SourceImage]:
    """The image members of a tar (by suffix), in the tar's order; an unreadable tar is an error naming it."""
    stat = file_stat(tar_path)
    try:
        with tarfile.open(tar_path) as tar:
            names = [member.name for member in tar.getmembers() if member.isfile()]
    except (tarfile.TarError, OSError) as error:
        raise ValueError(f"cannot read tar shard {tar_path}: {error}") from error
    return [SourceImage(f"{tar_id}{MEMBER_SEPARATOR}{name}", f"{tar_path}{MEMBER_SEPARATOR}{name}", stat)
            for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]


def list_source_images(sources: Sequence[Path]) -> list[SourceImage]:
    """Every image of the sources (files under folders by suffix, tar members), sorted by id; ids are unique."""
    root = source_root(sources)
    files: list[Path] = []
    for source in sources:
        files.extend(sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source])
    found: dict[str, SourceImage] = {}
    for path in files:
        suffix = path.suffix.lower()
        relative = path.relative_to(root).as_posix()
        if suffix in IMAGE_SUFFIXES:
            found[relative] = SourceImage(relative, str(path), file_stat(path))
        elif suffix == TAR_SUFFIX:
            found.update((image.id, image) for image in tar_images(path, relative))
    if not found:
        shown = ", ".join(str(source) for source in sources)
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) and no .tar shards under {shown}")
    return [found[key] for key in sorted(found)]


def split_member(path: str) -> tuple[str, str | None]:
    """``"<tar>#<member>"`` -> (tar path, member); a plain file path -> (path, None)."""
    if os.path.isfile(path) or MEMBER_SEPARATOR not in path:
        return path, None
    tar_path, _, member = path.rpartition(MEMBER_SEPARATOR)
    return (tar_path, member) if tar_path.lower().endswith(TAR_SUFFIX) else (path, None)


class ImageReader:
    """Reads image files and tar members as RGB PIL images, keeping the last tar open (close() when done)."""

    def __init__(self) -> None:
        self.tar_path: str | None = None
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}  # by name: TarFile.getmember is a linear search

    def read(self, path: str) -> Image.Image:
        """The image; ``ImageLoadError`` naming the path when it cannot be read."""
        file_path, member = split_member(path)
        if member is None:
            return load_image(file_path)
        try:
            data = self.member_bytes(file_path, member)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return load_image(image)
        except (OSError, KeyError, ValueError, SyntaxError, tarfile.TarError, Image.DecompressionBombError) as error:
            raise ImageLoadError(f"cannot load image {path}: {error}") from error

    def member_bytes(self, tar_path: str, member: str) -> bytes:
        if tar_path != self.tar_path:
            self.close()
            self.tar, self.tar_path = tarfile.open(tar_path), tar_path
            self.members = {info.name: info for info in self.tar.getmembers()}
        if member not in self.members:
            raise KeyError(f"{member} is not in {tar_path}")
        handle = self.tar.extractfile(self.members[member])
        if handle is None:
            raise KeyError(f"{member} is not a file in {tar_path}")
        return handle.read()

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
        self.tar, self.tar_path, self.members = None, None, {}
