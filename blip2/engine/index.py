"""An image index for text search (``blip2 index`` / ``blip2 search``): a stage-1 model's ITC image features of a
folder of images or of webdataset tar shards, built incrementally and resumably, ranked by a text's ITC similarity
(exact, or through faiss for large indexes), optionally re-ranked by ITM.

Layout of an index folder::

    index.json              {"format", "version", "model" (name or absolute folder), "model_fingerprint" (a hash of
                             some weights), "kind" ("queries" | "pooled"), "num_queries", "dim", "sources" (the
                             absolute folders / tars indexed), "parts" (in order), "count" (live images), "ann"}
    part-00000.safetensors  image_feats (n, Q, E) float32, normalized (Q = 1 for "pooled")
    part-00000.json         {"part", "ids", "paths", "stats" ([size, mtime_ns] per row), "unreadable"
                             ([id, path, stat] each), "removed" (ids)}: written after the tensors, it marks the part
                             done
    ann.faiss               the faiss index over the live vectors (only for a large index: ANN_MIN_IMAGES images
                             or ANN_MIN_VECTORS vectors; "ann" in index.json names the parts it covers)

The parts are an append-only log: a part's "removed" ids leave the index, its unreadable ids are known bad (not
retried until the file changes), and its rows replace older rows of the same ids. A build lists the source, and
embeds only the images that are new or whose size or mtime changed, in parts of ``PART_SIZE`` images; files that are
gone are listed as removed (their rows stay in the old part files but are never returned). A killed build keeps its
finished parts, and a rerun embeds only the rest, giving the same index as an uninterrupted run.

"queries" keeps all Q query features per image, and the score is the model's own ITC similarity
(``Blip2Qformer.similarity``: the max over queries of the cosine). "pooled" keeps one vector per image (the mean of
the Q normalized features, normalized): Q times smaller and faster, but its score is the cosine to that mean, not
the model's max-over-queries ITC, so rankings differ from the model's.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from blip2.engine import index_ann, index_store
from blip2.files import write_atomic, write_json_atomic
from blip2.engine.index_sources import ImageReader, SourceImage, list_source_images, source_paths
from blip2.models.scoring import encode_texts
from blip2.processing.auto import image_processor_for, model_source
from blip2.processing.image import ImageLoadError
from blip2.processing.text import clean_caption

logger = logging.getLogger("blip2")
PART_SIZE = 256  # images per part file: a killed build loses at most this many images' work
# "auto" searches through faiss from either size on (benchmarks/bench_index.py, one query, 2 CPU cores): exact scans
# N * Q vectors, faiss re-scores about REFINE_FACTOR * k images of Q vectors each; faiss was faster from 5k-10k
# pooled images (1.0x at 5k, 2.1x at 10k) and from 1k-2k images of 32 queries (0.7x at 32k vectors, 1.9x at 64k)
ANN_MIN_IMAGES = 8192
ANN_MIN_VECTORS = 65536
MODES = ("auto", "exact", "faiss")


@dataclass
class IndexBuildResult:
    output_dir: Path
    num_images: int  # images found in the source
    embedded: int  # embedded in this call
    reused: int  # already indexed (unchanged since)
    unreadable: list[str] = field(default_factory=list)  # ids of images that could not be read (this call or before)
    removed: list[str] = field(default_factory=list)  # ids dropped in this call (files gone)
    parts_written: list[str] = field(default_factory=list)
    ann_built: bool = False


def model_fingerprint(model) -> str:
    """A short hash of some of the model's weights (in float16, so a half-precision copy matches): an index and a
    model with different fingerprints were not made for each other."""
    digest = hashlib.sha256()
    tensors = [model.query_tokens, model.vision_proj.weight, model.text_proj.weight,
               next(model.vision_model.parameters())]
    for tensor in tensors:
        digest.update(tensor.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]


def recorded_model_name(model, model_name: str | os.PathLike | None) -> str:
    """The name recorded in index.json: ``model_name`` (else where the model was read from); a folder that exists
    is made absolute, so ``blip2 search`` finds it from anywhere."""
    name = model_name if model_name is not None else model_source(model)
    if name is None:
        return ""
    return str(Path(name).resolve()) if Path(name).exists() else str(name)


class ImageIndex:
    """The live rows of an index folder: ``ids``, ``paths`` and their features ``feats`` (N, Q, E), searchable by
    text features."""

    def __init__(self, folder: Path, header: dict[str, Any], ids: list[str], paths: list[str],
                 feats: torch.Tensor) -> None:
        self.folder, self.header = folder, header
        self.ids, self.paths, self.feats = ids, paths, feats
        self.model_name: str = header["model"]
        self.model_fingerprint: str = header["model_fingerprint"]
        self.kind: str = header["kind"]
        self._ann = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ImageIndex":
        """Read an index folder; FileNotFoundError / ValueError naming the problem."""
        folder = Path(path)
        header = index_store.read_header(folder)
        records = [index_store.read_part_record(folder, part) for part in header["parts"]]
        state = index_store.replay(records)
        ids = state.live_ids()
        rows_of: dict[int, list[int]] = {}
        for image_id in ids:  # (part, row) order
            number, row = state.live[image_id]
            rows_of.setdefault(number, []).append(row)
        blocks, shape = [], (0, header["num_queries"], header["dim"])
        for number, rows in rows_of.items():
            part = header["parts"][number]
            feats = index_store.read_part_feats(folder, part, records[number])
            blocks.append(feats[torch.tensor(rows)].float())
        feats = torch.cat(blocks) if blocks else torch.zeros(shape)
        if tuple(feats.shape[1:]) != shape[1:]:
            raise ValueError(f"index {folder}: features of shape {tuple(feats.shape[1:])}, index.json says {shape[1:]}")
        return cls(folder, header, ids, [state.paths[image_id] for image_id in ids], feats)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_vectors(self) -> int:
        """Stored vectors: images x Q."""
        return self.feats.shape[0] * self.feats.shape[1]

    def search_features(self, text_feats: torch.Tensor, k: int, mode: str = "auto"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """text_feats (T, E) normalized -> (scores (T, k'), rows (T, k')), k' = min(k, len), best first (ties:
        lower row first). ``mode``: "exact" (brute force), "faiss" (candidates from faiss, re-scored exactly), "auto"
        (faiss from ``ANN_MIN_IMAGES`` images or ``ANN_MIN_VECTORS`` vectors on, when the index has its faiss file or
        built one)."""
        check_search_args(k, mode)
        if text_feats.dim() != 2 or text_feats.shape[1] != self.feats.shape[2]:
            raise ValueError(f"text features of shape {tuple(text_feats.shape)}: expected (T, {self.feats.shape[2]})")
        text_feats = text_feats.detach().float().cpu()
        if len(self) == 0:
            return torch.zeros(len(text_feats), 0), torch.zeros(len(text_feats), 0, dtype=torch.long)
        use_faiss = mode == "faiss" or (mode == "auto" and self.large() and index_ann.faiss_available()
                                        and (self._ann is not None or self.ann_file_fresh()))
        if use_faiss:
            return index_ann.ann_search(self.ann(), self.feats, text_feats, k)
        return index_ann.exact_search(self.feats, text_feats, k)

    def large(self) -> bool:
        """Whether faiss is faster than exact here: ``ANN_MIN_IMAGES`` images or ``ANN_MIN_VECTORS`` vectors."""
        return len(self) >= ANN_MIN_IMAGES or self.num_vectors >= ANN_MIN_VECTORS

    def ann_file_fresh(self) -> bool:
        """Whether ``ann.faiss`` covers exactly this index's parts."""
        ann = self.header.get("ann")
        return bool(ann) and ann.get("parts") == self.header["parts"] and (self.folder / index_store.ANN_FILE).is_file()

    def ann(self):
        """The faiss index: the saved one when it is fresh and whole, else one built now (kept for later calls)."""
        if self._ann is None and self.ann_file_fresh():
            saved = index_ann.faiss_lib().read_index(str(self.folder / index_store.ANN_FILE))
            self._ann = saved if saved.ntotal == self.num_vectors else None
        if self._ann is None:
            self._ann = index_ann.build_ann(self.feats)
        return self._ann

    def open_image(self, row: int) -> Image.Image:
        """The image of a row (a file or a tar member); ``ImageLoadError`` when it cannot be read now."""
        reader = ImageReader()
        try:
            return reader.read(self.paths[row])
        finally:
            reader.close()


def check_search_args(k: int, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int")


# --- building ---------------------------------------------------------------------------------------------------
@dataclass
class BuildPlan:
    images: list[SourceImage]  # everything in the source
    todo: list[SourceImage]  # to embed: new, or changed since indexed
    removed: list[str]  # ids indexed (or known unreadable) whose files are gone
    reused: int
    known_unreadable: list[str]  # unchanged images that failed before


def plan_build(images: list[SourceImage], state: index_store.Replay) -> BuildPlan:
    listed = {image.id for image in images}
    removed = [image_id for image_id in (*state.live_ids(), *sorted(state.unreadable)) if image_id not in listed]
    todo, reused, known_bad = [], 0, []
    for image in images:
        unchanged = state.stats.get(image.id) == image.stat and state.paths.get(image.id) == image.path
        if unchanged and image.id in state.live:
            reused += 1
        elif unchanged and image.id in state.unreadable:
            known_bad.append(image.id)
        else:
            todo.append(image)
    return BuildPlan(images, todo, removed, reused, known_bad)


def open_index_header(folder: Path, model, model_name: str, kind: str, sources: list[str]) -> dict[str, Any]:
    """The header of the index being built: the existing one after checking it fits, or a new one."""
    index_store.check_index_folder(folder)
    fingerprint = model_fingerprint(model)
    if not (folder / index_store.HEADER).is_file():
        if folder.is_dir() and any(index_store.PART_NAME.fullmatch(entry.name) for entry in folder.iterdir()):
            raise ValueError(f"index {folder} has part files but no {index_store.HEADER}: build into a new folder")
        queries = 1 if kind == "pooled" else model.config.qformer_config.query_length
        return index_store.header(model_name, fingerprint, kind, queries, model.config.embed_dim, sources, [], 0)
    header = index_store.read_header(folder)
    if header["model_fingerprint"] != fingerprint:
        raise ValueError(f"index {folder} was built with model {header['model'] or '(unnamed)'} (weights "
                         f"{header['model_fingerprint']}); model {model_name or '(unnamed)'} has other weights "
                         f"({fingerprint}): use the same model, or another --output")
    if header["kind"] != kind:
        raise ValueError(f"index {folder} holds {header['kind']} features, not {kind}: "
                         f"{'drop' if kind == 'pooled' else 'add'} --pooled, or use another --output")
    if header["sources"] != sources:
        raise ValueError(f"index {folder} indexes {', '.join(header['sources'])}, not {', '.join(sources)}: "
                         "give the same source (new files there are added), or use another --output")
    return header


@torch.no_grad()
def embed_images(model, image_processor, reader: ImageReader, images: Sequence[SourceImage], batch_size: int,
                 device: torch.device, pooled: bool, bar) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Features of the readable images (n, Q or 1, E) in float32, their positions, the unreadable positions."""
    feats, good, bad = [], [], []
    for start in range(0, len(images), batch_size):
        pictures, positions = [], []
        for position in range(start, min(len(images), start + batch_size)):
            try:
                pictures.append(reader.read(images[position].path))
                positions.append(position)
            except ImageLoadError as error:
                logger.debug("skipped %s", error)
                bad.append(position)
        if pictures:
            pixel_values = image_processor(pictures)["pixel_values"].to(device)
            batch = model.get_image_features(pixel_values).float().cpu()  # (b, Q, E)
            feats.append(F.normalize(batch.mean(1), dim=-1)[:, None] if pooled else batch)
            good.extend(positions)
        bar.update(len(positions) + sum(1 for position in bad if position >= start))
    return (torch.cat(feats) if feats else None), good, bad


def part_record(images: Sequence[SourceImage], good: list[int], bad: list[int], removed: list[str]) -> dict:
    rows = [images[i] for i in good]
    return {"ids": [image.id for image in rows], "paths": [image.path for image in rows],
            "stats": [list(image.stat) for image in rows],
            "unreadable": [[images[i].id, images[i].path, list(images[i].stat)] for i in bad], "removed": removed}


def write_header(folder: Path, header: dict[str, Any], parts: list[str], records: list[dict]) -> None:
    header["parts"] = parts
    header["count"] = len(index_store.replay(records).live)
    write_json_atomic(folder / index_store.HEADER, header)


def refresh_ann(folder: Path, header: dict[str, Any]) -> bool:
    """Write ``ann.faiss`` for the index as it is now when it is ``large()`` (unless it is fresh already); below
    that, drop it. Returns whether one was written."""
    index = ImageIndex.load(folder)
    ann_path = folder / index_store.ANN_FILE
    if not index.large():
        header["ann"] = None
        write_json_atomic(folder / index_store.HEADER, header)
        ann_path.unlink(missing_ok=True)
        return False
    if index.ann_file_fresh():
        return False
    if not index_ann.faiss_available():
        logger.warning("%d images: searches would be faster through faiss (pip install faiss-cpu); exact for now",
                       len(index))
        return False
    ann = index_ann.build_ann(index.feats)
    write_atomic(ann_path, lambda temp: index_ann.faiss_lib().write_index(ann, str(temp)))
    header["ann"] = {"parts": list(header["parts"]), "vectors": int(ann.ntotal), "type": type(ann).__name__}
    write_json_atomic(folder / index_store.HEADER, header)
    return True


def build_index(model, images: str | os.PathLike | Sequence, output_dir, batch_size: int = 32, pooled: bool = False,
                progress: bool = True, device=None, *, part_size: int = PART_SIZE,
                model_name: str | os.PathLike | None = None, image_processor=None,
                on_part_written: Callable[[str], None] | None = None) -> IndexBuildResult:
    """Index the images of ``images`` (a folder of images and/or .tar shards, a .tar, or several) into
    ``output_dir``: only new and changed images are embedded; gone ones are removed. ``on_part_written(part)`` is
    called after each part this call writes."""
    if batch_size < 1 or part_size < 1:
        raise ValueError(f"batch_size and part_size must be >= 1, got {batch_size} and {part_size}")
    folder, sources = Path(output_dir), source_paths(images)
    name = recorded_model_name(model, model_name)
    header = open_index_header(folder, model, name, "pooled" if pooled else "queries", [str(s) for s in sources])
    listing = list_source_images(sources)  # a bad source is an error before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    parts = index_store.done_parts(folder)
    records = [index_store.read_part_record(folder, part) for part in parts]
    plan = plan_build(listing, index_store.replay(records))
    write_header(folder, header, parts, records)
    result = IndexBuildResult(folder, len(plan.images), 0, plan.reused, list(plan.known_unreadable), plan.removed)
    model = model.eval()
    device = device or next(model.parameters()).device
    image_processor = image_processor or image_processor_for(model, model_source(model))
    chunks = [plan.todo[start : start + part_size] for start in range(0, len(plan.todo), part_size)]
    if not chunks and plan.removed:
        chunks = [[]]  # a part that only removes
    reader = ImageReader()
    try:
        with tqdm(total=len(plan.todo), desc="index", unit="img", disable=not progress) as bar:
            for number, chunk in enumerate(chunks):
                feats, good, bad = embed_images(model, image_processor, reader, chunk, batch_size, device, pooled, bar)
                part = index_store.part_name(len(parts))
                records.append(part_record(chunk, good, bad, plan.removed if number == 0 else []))
                index_store.write_part(folder, part, feats, records[-1])
                parts.append(part)
                write_header(folder, header, parts, records)
                result.embedded += len(good)
                result.unreadable.extend(chunk[i].id for i in bad)
                result.parts_written.append(part)
                if on_part_written is not None:
                    on_part_written(part)
    finally:
        reader.close()
    result.ann_built = refresh_ann(folder, header)
    return result


# --- searching --------------------------------------------------------------------------------------------------
def text_inputs(model, processor_or_tokenizer) -> tuple[Any, int]:
    """The tokenizer and the text length: a ``Blip2Processor``'s, or a tokenizer with ``model.config.max_txt_len``."""
    tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    max_length = getattr(processor_or_tokenizer, "max_length", None) or model.config.max_txt_len
    return tokenizer, max_length


def check_model(index: ImageIndex, model) -> None:
    fingerprint = model_fingerprint(model)
    if fingerprint != index.model_fingerprint:
        raise ValueError(f"index {index.folder} was built with model {index.model_name or '(unnamed)'} (weights "
                         f"{index.model_fingerprint}); this model has other weights ({fingerprint}): search it with "
                         "the model that built it")


@torch.no_grad()
def itm_rerank(model, image_processor, index: ImageIndex, rows: list[int], itc: list[float], input_ids: torch.Tensor,
               attention_mask: torch.Tensor, device: torch.device, batch_size: int) -> list[tuple[int, float, float]]:
    """(row, itc, itm) for each row whose image can still be read, its ITM positive logit from ``encode_image``."""
    kept, pictures = [], []
    for row, score in zip(rows, itc):
        try:
            pictures.append(index.open_image(row))
            kept.append((row, score))
        except ImageLoadError as error:
            logger.warning("re-rank: left out %s (%s)", index.ids[row], error)
    itm = []
    for start in range(0, len(pictures), batch_size):
        pixel_values = image_processor(pictures[start : start + batch_size])["pixel_values"].to(device)
        image_embeds = model.encode_image(pixel_values)  # (b, N, D)
        count = len(image_embeds)
        logits = model.itm_logits_from_embeds(image_embeds, input_ids.expand(count, -1),
                                              attention_mask.expand(count, -1))
        itm.extend(logits[:, 1].float().cpu().tolist())
    return [(row, score, match) for (row, score), match in zip(kept, itm)]


def search(model, processor_or_tokenizer, index: ImageIndex, queries: Sequence[str], k: int = 10,
           rerank: bool = False, mode: str = "auto", device=None, batch_size: int = 32) -> list[list[dict]]:
    """Per query, best first: [{"rank", "id", "path", "score"} (+ "itc" and "itm" when rerank)].

    The score is the ITC similarity (max-over-queries cosine; for a "pooled" index the cosine to the pooled
    feature); with ``rerank`` the top ``k`` by ITC are re-scored as ITC + ITM positive logit (the image re-read and
    passed through the ViT), as retrieval evaluation re-ranks, and an image that cannot be read any more is left
    out. Queries are cleaned as captions are (lowercase, no punctuation)."""
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not queries or not all(isinstance(query, str) and query.strip() for query in queries):
        raise ValueError("queries must be non-empty strings")
    check_search_args(k, mode)
    check_model(index, model)
    model = model.eval()
    device = device or next(model.parameters()).device
    tokenizer, max_length = text_inputs(model, processor_or_tokenizer)
    text_feats, input_ids, attention_mask = encode_texts(model, tokenizer, [clean_caption(q) for q in queries],
                                                         max_length, device)
    scores, rows = index.search_features(text_feats.cpu(), k, mode)
    image_processor = None
    if rerank:
        image_processor = (getattr(processor_or_tokenizer, "image_processor", None)
                           or image_processor_for(model, model_source(model)))
    results = []
    for number in range(len(queries)):
        ranked = [(row, score, None) for row, score in zip(rows[number].tolist(), scores[number].tolist())]
        if rerank:
            scored = itm_rerank(model, image_processor, index, [r for r, _, _ in ranked], [s for _, s, _ in ranked],
                                input_ids[number : number + 1], attention_mask[number : number + 1], device,
                                batch_size)
            ranked = sorted(scored, key=lambda item: -(item[1] + item[2]))  # stable: ties keep the ITC order
        results.append([result_entry(index, rank, *item) for rank, item in enumerate(ranked, start=1)])
    return results


def result_entry(index: ImageIndex, rank: int, row: int, itc: float, itm: float | None) -> dict[str, Any]:
    entry = {"rank": rank, "id": index.ids[row], "path": index.paths[row], "row": row,
             "score": itc if itm is None else itc + itm}
    if itm is not None:
        entry.update(itc=itc, itm=itm)
    return entry
