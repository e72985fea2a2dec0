"""The model side of the server: per-request preprocessing, and one batch function per endpoint.

Preprocessing (an upload's PIL image -> a (3, S, S) tensor) runs in the request's thread; the ``*_batch`` methods run
on the batcher's single worker thread and take a list of items, one per request, returning one result per item.
Scoring reuses ``blip2.pipelines`` and ``blip2.models.scoring``, so an answer equals what the pipelines give. Every
item's answer is independent of the batch it came in: images are all resized to one size (no padding) and texts are
padded to ``max_length`` (``blip2.models.scoring.tokenize``), so an item alone and in a batch of 32 give the same
features (to float rounding) and the same ranks and captions.
"""

from __future__ import annotations

import functools
import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from PIL import Image

from blip2.engine.index import check_model, search
from blip2.models import Blip2Qformer
from blip2.models.scoring import ranked_labels, zero_shot_logits
from blip2.pipelines import pipeline
from blip2.processing.prompts import DEFAULT_TEMPLATE

THUMBNAIL_SIZE = 160  # longest side, in pixels
THUMBNAIL_CACHE = 256  # thumbnails kept in memory


class SearchableIndex(Protocol):
    """What the server needs of an index (``blip2.engine.index.ImageIndex``)."""

    ids: list[str]
    model_name: str

    def __len__(self) -> int: ...

    def search_features(self, text_feats: torch.Tensor, k: int, mode: str = "auto"): ...

    def open_image(self, row: int) -> Image.Image: ...


@dataclass(frozen=True)
class ClassifyItem:
    pixels: torch.Tensor  # (3, S, S)
    labels: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    top_k: int | None = None


@dataclass(frozen=True)
class CaptionItem:
    pixels: torch.Tensor  # (3, S, S), from ``caption_pixels``
    prompt: str | None = None


@dataclass(frozen=True)
class SearchItem:
    query: str
    k: int
    rerank: bool = False  # the top k re-scored as ITC + ITM match logit (the images re-read through the ViT)


class ModelService:
    """A stage-1 model (embed, classify, search, and captions from its Q-Former LM head unless a stage-2
    ``caption_model`` is given), its processor and optionally an image index, on ``device``."""

    def __init__(self, model: Blip2Qformer, device: torch.device | str = "cpu", caption_model=None,
                 index: SearchableIndex | None = None, model_name: str | None = None,
                 caption_settings: dict[str, Any] | None = None, search_mode: str = "auto") -> None:
        device = torch.device(device)
        self.classifier = pipeline("zero_shot_image_classification", model=model, device=device)
        self.retrieval = pipeline("feature_extraction", model=model, processor=self.classifier.processor,
                                  device=device)
        self.captioner = (pipeline("image_to_text_generation", model=caption_model, device=device)
                          if caption_model is not None else None)
        self.model, self.processor, self.device = self.classifier.model, self.classifier.processor, device
        if index is not None and hasattr(index, "model_fingerprint"):
            check_model(index, self.model)  # an index of another model's features would rank at random
        self.index = index
        self.model_name = model_name or getattr(model, "name_or_path", None) or type(model).__name__
        self.caption_settings = dict(caption_settings or {})
        self.search_mode = search_mode
        # row -> JPEG, the least recently used dropped first; lru_cache is safe on the request threads
        self.thumbnail = functools.lru_cache(maxsize=THUMBNAIL_CACHE)(self.make_thumbnail)

    # --- per request, in the request's thread --------------------------------------------------------------------
    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The stage-1 model's eval transform of one image: (3, S, S)."""
        return self.processor.image_processor.preprocess_one(image)

    def caption_pixels(self, image: Image.Image) -> torch.Tensor:
        """The captioning model's eval transform (the stage-2 model's own image processor when there is one)."""
        processor = self.captioner.processor if self.captioner is not None else self.processor
        return processor.image_processor.preprocess_one(image)

    def make_thumbnail(self, row: int) -> bytes:
        """A small JPEG of index row ``row`` (only rows of the index can be asked for, never a path);
        ``ImageLoadError`` when the image cannot be read any more (not cached: a later call tries again). Served
        through ``self.thumbnail``, its cache."""
        image = self.index.open_image(row)
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        return buffer.getvalue()

    # --- per batch, on the worker thread -------------------------------------------------------------------------
    def stack(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(pixels)).to(self.device)  # (B, 3, S, S)

    @torch.no_grad()
    def image_features(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Normalized query features (B, Q, E) in float32, on the CPU."""
        with self.classifier.autocast():
            return self.model.get_image_features(self.stack(pixels)).float().cpu()

    def embed_image_batch(self, items: list[torch.Tensor]) -> list[list]:
        return self.image_features(items).tolist()

    def embed_text_batch(self, items: list[str]) -> list[list[float]]:
        """Texts cleaned as captions (``clean_caption``), as the retrieval pipeline does: one (E,) feature each."""
        return self.retrieval.encode_texts(items, len(items))[0].cpu().tolist()

    @torch.no_grad()
    def classify_batch(self, items: list[ClassifyItem]) -> list[list[dict[str, Any]]]:
        """One image forward for the whole batch; label features per distinct (labels, template), cached."""
        image_feats = self.image_features([item.pixels for item in items])  # (B, Q, E)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            groups[(item.labels, item.template)].append(position)
        results: list[Any] = [None] * len(items)
        for (labels, template), positions in groups.items():
            label_feats = self.classifier.label_features(labels, template).cpu()  # (C, E)
            probs = zero_shot_logits(self.model, image_feats[positions], label_feats).softmax(-1)  # (b, C)
            for position, row in zip(positions, probs.split(1)):
                results[position] = ranked_labels(row, labels, items[position].top_k)[0]
        return results

    @torch.no_grad()
    def caption_batch(self, items: list[CaptionItem]) -> list[str]:
        pixel_values = self.stack([item.pixels for item in items])
        if self.captioner is not None:
            outputs = self.captioner.generate_from_pixels(pixel_values, [item.prompt for item in items],
                                                          **self.caption_settings)
            return [output["generated_text"] for output in outputs]
        with self.classifier.autocast():
            token_ids = self.model.generate(pixel_values, **self.caption_settings)
        return self.processor.batch_decode(token_ids)

    @torch.no_grad()
    def search_batch(self, items: list[SearchItem]) -> list[list[dict[str, Any]]]:
        """The queries' text features in one forward, then one index search for the largest k asked; a query with
        ``rerank`` goes through ``blip2.engine.index.search`` (its top k through the ViT and the ITM head)."""
        plain = [item for item in items if not item.rerank]
        answers: dict[int, list[dict[str, Any]]] = {}
        if plain:
            text_feats = self.retrieval.encode_texts([item.query for item in plain], len(plain))[0]  # (T, E)
            scores, rows = self.index.search_features(text_feats, max(item.k for item in plain),
                                                      mode=self.search_mode)
            for item, row_scores, row_ids in zip(plain, scores.tolist(), rows.tolist()):
                hits = [(row, score) for row, score in zip(row_ids, row_scores) if row >= 0][: item.k]
                answers[id(item)] = [{"rank": rank, "id": self.index.ids[row], "row": row, "score": score,
                                      "thumbnail": f"/thumbnail/{row}"} for rank, (row, score) in enumerate(hits, 1)]
        for item in items:
            if item.rerank:
                hits = search(self.model, self.processor, self.index, [item.query], k=item.k, rerank=True,
                              mode=self.search_mode, device=self.device)[0]
                answers[id(item)] = [{"rank": hit["rank"], "id": hit["id"], "row": hit["row"], "score": hit["score"],
                                      "itc": hit["itc"], "itm": hit["itm"], "thumbnail": f"/thumbnail/{hit['row']}"}
                                     for hit in hits]
        return [answers[id(item)] for item in items]
