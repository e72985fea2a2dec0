"""``blip2 search``: rank an index's images by text queries (see ``blip2.engine.index``): ITC similarity, and with
``--rerank`` the top k re-scored by ITC + ITM.

    blip2 search photos_index/ "a red bicycle" -k 10
    blip2 search photos_index/ "a red bicycle" "two dogs on a beach" --rerank --json
"""

from __future__ import annotations

import argparse
import json

import torch

from blip2.engine.distributed import pick_device
from blip2.engine.index import MODES, ImageIndex, search
from blip2.models import Blip2Qformer
from blip2.processing.auto import default_processor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", help="an index folder written by blip2 index")
    parser.add_argument("queries", nargs="+", help="one or more text queries")
    parser.add_argument("-k", "--top_k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--rerank", action="store_true",
                        help="re-score the top k by ITC + ITM (re-reads those images through the ViT)")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="exact: brute force; faiss: faiss candidates re-scored exactly; auto: faiss for large "
                             "indexes (default)")
    parser.add_argument("--model", help="the stage-1 model (default: the one recorded in the index)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (one list per query)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="seeds a model built at random (blip2_tiny)")


def print_table(query: str, results: list[dict], rerank: bool) -> None:
    print(f"query: {query}")
    if not results:
        print("  (the index is empty)")
    columns = "rank   score     itc     itm  id" if rerank else "rank   score  id"
    print(columns)
    for entry in results:
        extra = f" {entry['itc']:7.4f} {entry['itm']:7.4f}" if rerank else ""
        print(f"{entry['rank']:4d} {entry['score']:7.4f}{extra}  {entry['id']}")


def cmd_search(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise ValueError(f"-k must be >= 1, got {args.top_k}")
    index = ImageIndex.load(args.index)  # a missing or broken index is an error before any model is read
    name = args.model or index.model_name
    if not name:
        raise ValueError(f"index {args.index} records no model name: pass --model")
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    model = Blip2Qformer.from_pretrained(name).to(device).eval()
    results = search(model, default_processor(model, name), index, args.queries, k=args.top_k, rerank=args.rerank,
                     mode=args.mode, device=device)
    if args.json:
        print(json.dumps([{"query": query, "results": found} for query, found in zip(args.queries, results)],
                         indent=1))
        return 0
    for number, (query, found) in enumerate(zip(args.queries, results)):
        if number:
            print()
        print_table(query, found, args.rerank)
    return 0
