"""Image index search: exact (``Blip2Qformer.similarity`` + a stable top-k) against faiss (4-bit PQ fast scan
candidates re-scored exactly), on random unit features, one text query at a time (as ``blip2 search`` and the web
server ask). Sets ``blip2.engine.index.ANN_MIN_VECTORS``: the stored-vector count from which faiss is faster.

Random unit vectors are the worst case for an approximate search (no clusters to exploit): a graph (HNSW) or an
inverted-list (IVF) index has to visit nearly every vector to reach recall 0.99 on them (``--hnsw`` shows it), which
is why the index uses a quantized scan with an exact re-score.

Columns: images, Q (vectors per image: 1 pooled, 32 with all query features), stored vectors, exact ms and faiss ms
per query (median over ``--queries`` queries), speed-up = exact / faiss, recall@10 of faiss against the exact top 10,
and the faiss build time (train + add).

    python benchmarks/bench_index.py                                   # 1k, 10k, 50k, 200k images, pooled
    python benchmarks/bench_index.py --images 1000,5000 --per-image 32  # with all 32 query features
    python benchmarks/bench_index.py --images 50000 --hnsw               # HNSW's recall and time on the same data
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

import common
from blip2.engine import index_ann

K = 10


def unit_features(rows: int, per_image: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(rows, per_image, dim, generator=generator)
    return torch.nn.functional.normalize(feats, dim=-1)


def per_query_ms(search, texts: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    search(texts[:1])  # warm up
    times, rows = [], []
    for text in texts:
        start = time.perf_counter()
        rows.append(search(text[None])[1][0])
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), rows


def recall(found: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(found, truth)]))


def hnsw_row(feats: torch.Tensor, texts: torch.Tensor, truth: list[torch.Tensor]) -> None:
    faiss = index_ann.faiss_lib()
    vectors = index_ann.ann_vectors(feats)
    start = time.perf_counter()
    index = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    print(f"HNSW32 build {time.perf_counter() - start:.1f} s")
    for ef in (256, 1024, 4096):
        index.hnsw.efSearch = ef
        ms, found = per_query_ms(lambda t: (None, torch.from_numpy(index.search(t.numpy(), K)[1])), texts)
        print(f"  efSearch {ef}: {ms:.2f} ms/query, recall@10 {recall(found, truth):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="1000,10000,50000,200000")
    parser.add_argument("--per-image", type=int, default=1, help="vectors per image (1 pooled, 32 queries)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--hnsw", action="store_true", help="also HNSW (M=32) at several efSearch")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # faiss builds with its default threads and searches with one
    print(f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}, E={args.dim}, k={K}, "
          f"refine factor {index_ann.REFINE_FACTOR}")
    print("| images | Q | vectors | exact ms | faiss ms | speed-up | recall@10 | faiss build s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for images in common.parse_list(args.images, int):
        feats = unit_features(images, args.per_image, args.dim, seed=0)
        texts = unit_features(args.queries, 1, args.dim, seed=1)[:, 0]
        exact_ms, truth = per_query_ms(lambda t: index_ann.exact_search(feats, t, K), texts)
        start = time.perf_counter()
        ann = index_ann.build_ann(feats)
        build_s = time.perf_counter() - start
        faiss_ms, found = per_query_ms(lambda t: index_ann.ann_search(ann, feats, t, K), texts)
        print(f"| {images} | {args.per_image} | {images * args.per_image} | {exact_ms:.2f} | {faiss_ms:.2f} | "
              f"{exact_ms / faiss_ms:.2f} | {recall(found, truth):.3f} | {build_s:.1f} |", flush=True)
        if args.hnsw:
            hnsw_row(feats, texts, truth)


if __name__ == "__main__":
    main()
