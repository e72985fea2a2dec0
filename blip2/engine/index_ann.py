"""Ranking an index's images by text features: exact (the model's own ``Blip2Qformer.similarity``, chunked) and
through faiss (a 4-bit product-quantized fast scan for candidates, then the exact score of each candidate).

The faiss step only chooses candidates: every returned score is the exact max-over-queries cosine of the stored
features (to the last bit or so: a product over other rows may round differently), so a faiss result differs from
the exact one only by a missed image, never by a wrong score. The index
holds one vector per stored feature (N * Q for "queries", N for "pooled"); the vectors found are grouped by image.

Why a quantized scan rather than a graph (HNSW) or IVF: on features without structure (random unit vectors,
benchmarks/bench_index.py) a graph or an inverted list must visit almost every vector to reach recall 0.99, so they
are slower than the exact product; an 8x smaller 4-bit code scanned with SIMD, re-scored exactly over
``REFINE_FACTOR * k`` candidates, keeps recall at 0.99+ on such data and is many times faster than exact at 50k+.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

from blip2.models import Blip2Qformer

EXACT_CHUNK_VECTORS = 1 << 21  # stored vectors per similarity call: bounds the (chunk * Q, T) score block
SCORE_BUDGET = 1 << 26  # floats of the (T, N) score matrix computed at once (T is split beyond it)
REFINE_FACTOR = 50  # vectors fetched from faiss per requested image, re-scored exactly
PQ_MIN_VECTORS = 4096  # below this the faiss index is a flat (exact) inner-product index: too few to train on
PQ_TRAIN_VECTORS = 32768  # vectors sampled to train the quantizer (16 centroids per sub-space need few)
PQ_SEED = 0


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores`` (T, N): the ``k`` best values and columns, best first, ties broken by lower column."""
    k = min(k, scores.shape[1])
    if k == 0:
        return scores.new_zeros(scores.shape[0], 0), torch.zeros(scores.shape[0], 0, dtype=torch.long)
    kth = scores.topk(k, dim=1).values[:, -1:]  # every column scoring >= the k-th value is a candidate
    values, columns = [], []
    for row, threshold in zip(scores, kth):
        candidates = (row >= threshold).nonzero().squeeze(1)  # ascending: sorting stably keeps lower columns first
        order = row[candidates].sort(descending=True, stable=True).indices[:k]
        values.append(row[candidates[order]])
        columns.append(candidates[order])
    return torch.stack(values), torch.stack(columns)


def exact_scores(feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """``Blip2Qformer.similarity(feats, text_feats).t()``: (T, N), in chunks of images."""
    num_images, queries, _ = feats.shape
    chunk = max(1, EXACT_CHUNK_VECTORS // max(1, queries))
    if num_images <= chunk:
        return Blip2Qformer.similarity(feats, text_feats).t()
    parts = [Blip2Qformer.similarity(feats[start : start + chunk], text_feats)
             for start in range(0, num_images, chunk)]
    return torch.cat(parts).t()


def exact_search(feats: torch.Tensor, text_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The brute-force ITC ranking: scores and rows (T, min(k, N)), best first, ties by lower row."""
    block = max(1, SCORE_BUDGET // max(1, len(feats)))
    results = [stable_topk(exact_scores(feats, text_feats[start : start + block]), k)
               for start in range(0, len(text_feats), block)]
    return torch.cat([scores for scores, _ in results]), torch.cat([rows for _, rows in results])


def faiss_available() -> bool:
    """Whether faiss can be imported (the ``index`` extra): without it, "auto" search stays exact."""
    return importlib.util.find_spec("faiss") is not None


def faiss_lib():
    """The faiss module, set to one OpenMP thread (process-wide): faiss's own OpenMP runtime, spinning beside
    torch's, made both several times slower on a shared CPU (benchmarks/bench_index.py: a 50k search 9 ms on two
    threads against 2 ms on one, the exact search beside it 50 ms against 14; a 200k build 13 s against 5 s).
    Without faiss installed: a ValueError saying what to install."""
    try:
        import faiss
    except ImportError:
        raise ValueError("faiss is not installed: pip install faiss-cpu (or blip2[index]); exact search needs "
                         "none") from None

    faiss.omp_set_num_threads(1)
    return faiss


def ann_vectors(feats: torch.Tensor) -> np.ndarray:
    """The stored features as faiss vectors (N * Q, E), float32, row-major: vector v is image v // Q."""
    return np.ascontiguousarray(feats.reshape(-1, feats.shape[-1]).float().numpy())


def build_ann(feats: torch.Tensor):
    """A faiss index over every stored vector: a 4-bit PQ fast scan (E sub-spaces of one dimension), or a flat
    exact one below ``PQ_MIN_VECTORS``."""
    faiss = faiss_lib()
    vectors = ann_vectors(feats)
    count, dim = vectors.shape
    if count < PQ_MIN_VECTORS:
        index = faiss.IndexFlatIP(dim)
    else:
        # one 4-bit code per dimension (8x smaller than float32): with two dimensions per code, recall@10 of the
        # max over 32 queries fell to 0.988 at 50k images; with one it stays 1.0 at the same speed
        index = faiss.IndexPQFastScan(dim, dim, 4, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(PQ_SEED).choice(count, min(count, PQ_TRAIN_VECTORS), replace=False)
        index.train(vectors[np.sort(sample)])
    index.add(vectors)
    return index


def ann_candidates(index, text_feats: torch.Tensor, queries: int, k: int) -> list[torch.Tensor]:
    """Per text, the images (ascending rows) owning the vectors faiss finds; at least ``k`` of them, fetching more
    vectors while some text has fewer (an image can own up to ``queries`` of the vectors found)."""
    want = min(index.ntotal, k * REFINE_FACTOR)
    text = np.ascontiguousarray(text_feats.float().numpy())
    while True:
        _, found = index.search(text, want)  # (T, want); -1 where fewer exist
        candidates = [torch.from_numpy(np.unique(row[row >= 0] // queries)) for row in found]
        if want >= index.ntotal or all(len(rows) >= k for rows in candidates):
            return candidates
        want = min(index.ntotal, want * 4)


def ann_search(index, feats: torch.Tensor, text_feats: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss candidates, re-scored exactly: scores and rows (T, min(k, N)), best first, ties by lower row."""
    k = min(k, len(feats))
    scores, rows = [], []
    for text, candidates in zip(text_feats, ann_candidates(index, text_feats, feats.shape[1], k)):
        candidate_scores = Blip2Qformer.similarity(feats[candidates], text[None]).t()  # (1, C)
        top_scores, top = stable_topk(candidate_scores, k)
        scores.append(top_scores[0])
        rows.append(candidates[top[0]])
    return torch.stack(scores), torch.stack(rows)
