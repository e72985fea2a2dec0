"""``blip2 serve`` under load: dynamic batching against one forward per request, in one run.

Two servers are started in turn as subprocesses (``python -m blip2 serve``, so the client below does not share the
server's interpreter): one with ``--max_batch_size 1`` (unbatched: every request is its own forward) and one with
``--max_batch_size B --batch_window_ms W`` (batched). Against each, ``--concurrency`` clients on loopback
(``httpx.AsyncClient``, one connection each) send ``--requests`` requests per endpoint as fast as answers come back:
``/caption`` (an image upload, the Q-Former's beam search), ``/embed`` with an image, ``/embed`` with a text,
``/classify`` (an image and 5 labels) and ``/search`` (over an index of ``--index-images`` generated images, built
first with ``build_index``). Reported per endpoint and mode: requests/s, p50 and p99 latency (ms, over all timed
requests), the mean batch size the server ran (from ``/healthz``), the speed-up (batched requests/s over
unbatched), and whether the first request's answer is the same from both servers (floats to 1e-5).

    python benchmarks/bench_serve.py                              # blip2_tiny, 32 clients, B=16, W=5 ms
    python benchmarks/bench_serve.py --endpoints caption,embed_image --requests 256 --concurrency 64
    python benchmarks/bench_serve.py --model vit-b                # a random ViT-B/16 + bert-base Q-Former folder
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import common
from blip2 import Blip2Qformer
from blip2.engine.index import build_index

LABELS = "red circle,blue square,green triangle,yellow star,white cross"
QUERIES = ["a red circle", "two blue squares", "a green triangle on white", "something yellow", "a cross"]
ENDPOINTS = ("caption", "embed_image", "embed_text", "classify", "search")
START_TIMEOUT_S = 180


def image_uploads(count: int = 8, size: int = 64) -> list[bytes]:
    rng = np.random.default_rng(0)
    uploads = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        uploads.append(buffer.getvalue())
    return uploads


def request_for(endpoint: str, i: int, uploads: list[bytes]) -> tuple[str, str, dict]:
    """(method, path, httpx keyword arguments) of request ``i`` to ``endpoint``."""
    image = {"image": (f"{i}.png", uploads[i % len(uploads)], "image/png")}
    if endpoint == "caption":
        return "POST", "/caption", {"files": image}
    if endpoint == "embed_image":
        return "POST", "/embed", {"files": image}
    if endpoint == "embed_text":
        return "POST", "/embed", {"data": {"text": f"{QUERIES[i % len(QUERIES)]} number {i}"}}
    if endpoint == "classify":
        return "POST", "/classify", {"files": image, "data": {"labels": LABELS}}
    return "GET", "/search", {"params": {"q": QUERIES[i % len(QUERIES)], "k": 10}}


# --- the server ---------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, model: str, index: Path | None, max_batch_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "blip2", "serve", "--model", model, "--port", str(port), "--device", args.device,
               "--max_batch_size", str(max_batch_size), "--batch_window_ms", str(args.batch_window_ms),
               "--max_queue", "4096", "--threads", str(args.threads), "--log_level", "warning"]
    command += ["--index", str(index)] if index is not None else []
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not answer /healthz within {START_TIMEOUT_S} s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


# --- the load -----------------------------------------------------------------------------------------------------
async def load(url: str, endpoint: str, requests: int, concurrency: int, uploads: list[bytes],
               warmup: int) -> tuple[float, list[float], object]:
    """(wall seconds, latencies in ms, the first request's answer) for ``requests`` requests from ``concurrency``
    clients, after ``warmup`` untimed ones."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as http:
        async def call(i: int) -> tuple[float, object]:
            method, path, kwargs = request_for(endpoint, i, uploads)
            start = time.perf_counter()
            response = await http.request(method, path, **kwargs)
            elapsed = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise SystemExit(f"{endpoint}: HTTP {response.status_code}: {response.text[:300]}")
            return elapsed, response.json()

        await asyncio.gather(*(call(i) for i in range(max(warmup, concurrency))))
        first = (await call(0))[1]
        pending = iter(range(requests))
        latencies: list[float] = []

        async def client() -> None:
            for i in pending:  # the clients share one iterator: each takes the next request when it is free
                latencies.append((await call(i))[0])

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies, first


def batch_counts(url: str) -> dict[str, tuple[int, int]]:
    queues = httpx.get(f"{url}/healthz", timeout=10).json()["queues"]
    return {name: (queue["requests"], queue["batches"]) for name, queue in queues.items()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def measure(args, url: str, uploads: list[bytes]) -> dict[str, dict]:
    results = {}
    for endpoint in args.endpoints:
        before = batch_counts(url)
        wall, latencies, first = asyncio.run(load(url, endpoint, args.requests, args.concurrency, uploads,
                                                  args.warmup))
        after = batch_counts(url)
        requests = after[endpoint][0] - before[endpoint][0]
        batches = after[endpoint][1] - before[endpoint][1]
        results[endpoint] = {"rps": len(latencies) / wall, "p50": statistics.median(latencies),
                             "p99": percentile(latencies, 99), "batch": requests / max(1, batches), "first": first}
        print(f"  {endpoint}: {results[endpoint]['rps']:.1f} req/s", file=sys.stderr)
    return results


def same_answer(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_answer(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_answer(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-5
    return a == b


# --- setup and report ---------------------------------------------------------------------------------------------
def prepare_model(name: str, folder: Path) -> tuple[str, Blip2Qformer]:
    """The model name to serve and the same model here (for the index): a preset, or ``vit-b``/``tiny`` from
    ``common.CONFIGS`` saved to a folder with random weights (seed 0)."""
    torch.manual_seed(0)
    if name in common.CONFIGS and name != "tiny":
        model = Blip2Qformer(common.CONFIGS[name]())
        model.save_pretrained(folder / "model")
        return str(folder / "model"), model
    name = "blip2_tiny" if name == "tiny" else name
    return name, Blip2Qformer.from_pretrained(name)


def build_search_index(model: Blip2Qformer, count: int, folder: Path) -> Path:
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    build_index(model.eval(), images, folder / "index", progress=False)
    return folder / "index"


def report(args, unbatched: dict, batched: dict) -> None:
    print(f"\nblip2 serve, model {args.model}, {args.concurrency} concurrent clients on loopback, {args.requests} "
          f"requests per endpoint and mode; batched = --max_batch_size {args.max_batch_size} --batch_window_ms "
          f"{args.batch_window_ms}, unbatched = --max_batch_size 1; server: --threads {args.threads}\n")
    headers = ["endpoint", "mode", "req/s", "p50 ms", "p99 ms", "mean batch", "speed-up", "same answer"]
    rows = []
    for endpoint in args.endpoints:
        one, many = unbatched[endpoint], batched[endpoint]
        same = "yes" if same_answer(one["first"], many["first"]) else "NO"
        for mode, result in (("unbatched", one), ("batched", many)):
            speedup = f"{many['rps'] / one['rps']:.2f}x" if mode == "batched" else ""
            rows.append([endpoint, mode, f"{result['rps']:.1f}", f"{result['p50']:.1f}", f"{result['p99']:.1f}",
                         f"{result['batch']:.1f}", speedup, same if mode == "batched" else ""])
    print(common.markdown_table(headers, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a preset or folder, or tiny / vit-b (random weights)")
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help=f"some of {', '.join(ENDPOINTS)}")
    parser.add_argument("--requests", type=int, default=256, help="timed requests per endpoint and mode")
    parser.add_argument("--concurrency", type=int, default=32, help="clients sending at once")
    parser.add_argument("--warmup", type=int, default=32,
                        help="untimed requests per endpoint first, at once (at least --concurrency: every client's "
                             "connection is open before timing)")
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_window_ms", type=float, default=5.0)
    parser.add_argument("--index-images", type=int, default=256, help="images in the /search index")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (default 1: the client takes the other core)")
    args = parser.parse_args()
    args.endpoints = common.parse_list(args.endpoints)
    unknown = [name for name in args.endpoints if name not in ENDPOINTS]
    if unknown:
        raise SystemExit(f"unknown endpoint {unknown[0]!r}; available: {', '.join(ENDPOINTS)}")
    print(common.machine_note(torch.device(args.device)) + f"; client and server share the machine "
          f"({os.cpu_count()} cores)")
    uploads = image_uploads()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        served, model = prepare_model(args.model, folder)
        index = build_search_index(model, args.index_images, folder) if "search" in args.endpoints else None
        del model
        results = {}
        for mode, batch_size in (("unbatched", 1), ("batched", args.max_batch_size)):
            print(f"{mode} server:", file=sys.stderr)
            process, url = start_server(args, served, index, batch_size, folder / f"{mode}.log")
            try:
                results[mode] = measure(args, url, uploads)
            finally:
                stop_server(process)
    report(args, results["unbatched"], results["batched"])


if __name__ == "__main__":
    main()
