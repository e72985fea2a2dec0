"""Image-text retrieval evaluation across processes (LAVIS ``compute_sim_matrix``: ITC top ``k_test`` re-ranked by
ITM), sharded: every process encodes its own contiguous share of the images and of the texts (whole batches of the
one-process order, so the features are the same), the features are gathered, and the similarity rows are taken in
chunks (chunk c goes to rank c % W): each chunk's ITC top-k is re-ranked by ITM and only the top-k columns and their
scores are kept and gathered. No process ever holds an (N_img, N_txt) matrix; the metrics are read from the top-k
(``topk_retrieval_metrics``) and equal those of the dense scores (``blip2.engine.metrics.retrieval_metrics``).

``rerank_scores`` is the dense form (every row filled, ``FILL`` outside the top-k), kept for small sets."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from blip2.engine import distributed
from blip2.models import scoring
from blip2.models.scoring import FILL, ITM_PAIRS_PER_CALL

logger = logging.getLogger("blip2")
DIRECTIONS = ("i2t", "t2i")


@torch.no_grad()
def rerank_scores(itm_fn, sims: torch.Tensor, image_embeds: torch.Tensor, text_ids: torch.Tensor,
                  text_mask: torch.Tensor, k_test: int, batch_size: int = ITM_PAIRS_PER_CALL, add_itm: bool = True,
                  progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-ranked (N_img, N_txt) image->text and (N_txt, N_img) text->image scores, every row filled: rows are shared
    out over the processes (row r goes to rank r % W) and combined here (see ``scoring.rerank_scores``)."""
    world = distributed.world_size()
    score_i2t, score_t2i = scoring.rerank_scores(itm_fn, sims, image_embeds, text_ids, text_mask, k_test,
                                                 batch_size=batch_size, add_itm=add_itm, progress=progress,
                                                 rank=distributed.rank(), world_size=world)
    if world > 1:
        # every row was filled by exactly one rank; elsewhere it holds FILL. Shift, sum, shift back.
        for scores in (score_i2t, score_t2i):
            scores -= FILL
            distributed.all_reduce_sum(scores)
            scores += FILL
    return score_i2t, score_t2i


def share_range(count: int, unit: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous share [start, end) of ``count`` items, in whole units of ``unit`` items (batches):
    the units are split as evenly as they go, the earlier ranks taking one more where they do not divide."""
    units = -(-count // max(1, unit))
    first, last = -(-units * rank // world), -(-units * (rank + 1) // world)
    return min(count, first * unit), min(count, last * unit)


@torch.no_grad()
def encode_image_share(model, dataset, make_loader: Callable[[Any], Any], batch_size: int, device: torch.device,
                       autocast=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank encodes its share of ``dataset`` (``make_loader(subset)`` gives its batches of ``batch_size``);
    returns every rank's query features (N, Q, E) and ViT embeddings (N, T, D), gathered in order, and how many
    images this rank encoded."""
    start, end = share_range(len(dataset), batch_size, distributed.rank(), distributed.world_size())
    loader = make_loader(Subset(dataset, range(start, end)))
    kwargs = {"autocast": autocast} if autocast is not None else {}
    feats = embeds = None  # an empty share still takes part in the gathers
    if end > start:
        feats, embeds, _ = scoring.encode_images(model, loader, device, progress=progress, **kwargs)
    return distributed.all_gather_varlen(feats), distributed.all_gather_varlen(embeds), end - start


@torch.no_grad()
def encode_text_share(model, tokenizer, texts: Sequence[str], max_length: int, device: torch.device,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """This rank encodes its share of ``texts``; returns every text's features (N, E) (gathered), token ids and
    masks (N, L) (every rank tokenizes them all: cheap, and the re-rank needs any text), and the share's size."""
    start, end = share_range(len(texts), batch_size, distributed.rank(), distributed.world_size())
    feats = scoring.encode_texts(model, tokenizer, list(texts[start:end]), max_length, device,
                                 batch_size=batch_size)[0].float() if end > start else None
    ids, mask = scoring.tokenize(tokenizer, list(texts), max_length, device)
    return distributed.all_gather_varlen(feats), ids, mask, end - start


def _chunks_of_rank(count: int, rows_per_chunk: int, rank: int, world: int) -> list[tuple[int, int]]:
    starts = range(0, count, max(1, rows_per_chunk))
    return [(start, min(count, start + rows_per_chunk)) for number, start in enumerate(starts)
            if number % world == rank]


def _row_sims(similarity, direction: str, image_feats: torch.Tensor, text_feats: torch.Tensor, start: int,
              end: int) -> torch.Tensor:
    if direction == "i2t":
        return similarity(image_feats[start:end], text_feats)
    return similarity(image_feats, text_feats[start:end]).t()


@torch.no_grad()
def topk_scores(itm_fn, similarity, image_feats: torch.Tensor, text_feats: torch.Tensor, image_embeds: torch.Tensor,
                text_ids: torch.Tensor, text_mask: torch.Tensor, k_test: int, rows_per_chunk: int = 32,
                batch_size: int = ITM_PAIRS_PER_CALL, add_itm: bool = True,
                progress: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The re-rank, sharded and memory-lean: ``{"i2t": (index (N_img, k), scores), "t2i": (index (N_txt, k),
    scores)}`` on every rank: each row's top ``k_test`` ITC columns and their ITC + ITM scores. ``similarity(image
    feats, text feats) -> (n_img, n_txt)`` is applied to ``rows_per_chunk`` rows at a time; chunk c is re-ranked by
    rank c % W and the chunks are gathered, so a row gets the same scores whatever the number of processes."""
    rank, world = distributed.rank(), distributed.world_size()
    sizes = {"i2t": image_feats.shape[0], "t2i": text_feats.shape[0]}
    jobs = [(direction, start, end) for direction in DIRECTIONS
            for start, end in _chunks_of_rank(sizes[direction], rows_per_chunk, rank, world)]
    parts: dict[str, list] = {direction: [] for direction in DIRECTIONS}
    for direction, start, end in tqdm(jobs, desc="ITM re-rank", disable=not progress, leave=False):
        rows = torch.arange(start, end, device=image_feats.device)
        row_sims = _row_sims(similarity, direction, image_feats, text_feats, start, end)
        index, scores = scoring.rerank_rows(itm_fn, row_sims, rows, direction, image_embeds, text_ids, text_mask,
                                            k_test, batch_size=batch_size, add_itm=add_itm)
        parts[direction].append((rows, index, scores))
    result = {}
    for direction in DIRECTIONS:
        columns = sizes["t2i" if direction == "i2t" else "i2t"]
        result[direction] = _gather_rows(parts[direction], sizes[direction], min(k_test, columns),
                                         image_feats.device)
    return result


def _gather_rows(parts: list, count: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (rows, index, scores) parts -> (count, k) index and scores, row by row."""
    rows = torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dtype=torch.long, device=device)
    index = torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, k, dtype=torch.long, device=device)
    scores = torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, k, dtype=torch.float32, device=device)
    rows, index, scores = (distributed.all_gather_varlen(t) for t in (rows, index, scores))
    out_index = torch.zeros(count, k, dtype=torch.long, device=device)
    out_scores = torch.full((count, k), FILL, dtype=torch.float32, device=device)
    out_index[rows], out_scores[rows] = index, scores
    return out_index.cpu(), out_scores.cpu()


def topk_ranks(index: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor,
               num_columns: int) -> torch.Tensor:
    """The 0-based rank of column ``columns[p]`` in row ``rows[p]`` of the dense scores that the top-k ``index``
    and ``scores`` (R, k) stand for (``FILL`` in every other column): the columns it is behind, best score first,
    ties in column order (as a stable descending sort)."""
    index, scores = index[rows], scores[rows]  # (P, k)
    target = columns[:, None]
    hit = index == target
    own = torch.where(hit, scores, torch.full_like(scores, float("-inf"))).amax(1)
    own = torch.where(hit.any(1), own, torch.full_like(own, FILL))[:, None]
    ahead = (scores > own).sum(1) + ((scores == own) & (index < target)).sum(1)
    unscored = num_columns - index.shape[1]  # columns outside the top-k, all at FILL
    below_target = columns - (index < target).sum(1)  # of them, those left of the target column
    ahead += torch.where(own[:, 0] < FILL, torch.full_like(ahead, unscored), torch.zeros_like(ahead))
    ahead += torch.where(own[:, 0] == FILL, below_target, torch.zeros_like(ahead))
    return ahead


def topk_retrieval_metrics(i2t: tuple[torch.Tensor, torch.Tensor], t2i: tuple[torch.Tensor, torch.Tensor],
                           img2txt: dict[int, list[int]], txt2img: dict[int, int]) -> dict[str, float]:
    """``retrieval_metrics`` from the top-k re-rank (``topk_scores``) instead of dense score matrices."""
    num_images, num_texts = i2t[0].shape[0], t2i[0].shape[0]
    pairs = [(image, text) for image in range(num_images) for text in img2txt[image]]
    images = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    texts = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    pair_ranks = topk_ranks(*i2t, images, texts, num_texts)
    image_ranks = torch.full((num_images,), num_texts, dtype=torch.long).scatter_reduce(0, images, pair_ranks, "amin")
    text_rows = torch.arange(num_texts)
    gold = torch.tensor([txt2img[text] for text in range(num_texts)], dtype=torch.long)
    text_ranks = topk_ranks(*t2i, text_rows, gold, num_images)
    result = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        for k in (1, 5, 10):
            result[f"{prefix}_r{k}"] = 100.0 * float((ranks < k).double().mean())
        result[f"{prefix}_r_mean"] = (result[f"{prefix}_r1"] + result[f"{prefix}_r5"] + result[f"{prefix}_r10"]) / 3
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    result["agg_metrics"] = result["txt_r_mean"]
    return result
