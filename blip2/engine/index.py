"""An image index for text search (``blip2 index`` / ``blip2 search``): see the layout below."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image


@dataclass
class IndexBuildResult:
    output_dir: Path
    num_images: int  # images found in the source
    embedded: int  # embedded in this call
    reused: int  # already indexed (unchanged since)
    unreadable: list[str] = field(default_factory=list)  # ids of images that could not be read
    removed: list[str] = field(default_factory=list)  # ids dropped since the last run (deleted or changed files)


class ImageIndex:
    """The live rows of an index folder: ``ids``, ``paths`` and their features, searchable by text features."""

    ids: list[str]
    paths: list[str]
    model_name: str

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImageIndex":
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def search_features(self, text_feats: torch.Tensor, k: int, mode: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_feats (T, E) normalized -> (scores (T, k'), rows (T, k')), k' = min(k, len), best first."""
        raise NotImplementedError

    def open_image(self, row: int) -> Image.Image:
        raise NotImplementedError


def build_index(model, images: str | os.PathLike | Sequence, output_dir, batch_size: int = 32, pooled: bool = False,
                progress: bool = True, device=None) -> IndexBuildResult:
    raise NotImplementedError


def search(model, processor_or_tokenizer, index: ImageIndex, queries: Sequence[str], k: int = 10,
           rerank: bool = False, mode: str = "auto", device=None) -> list[list[dict]]:
    """Per query, best first: [{"rank", "id", "path", "score"} (+ "itc" and "itm" when rerank)]."""
    raise NotImplementedError
