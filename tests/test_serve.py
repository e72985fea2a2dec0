"""``blip2 serve`` (issue 13, serving): the HTTP API on a real uvicorn server on a free loopback port.

Answers equal the library's (pipelines, ``generate``, ``blip2.engine.index.search``); 32 concurrent requests get
the answers sequential ones get, and are batched; a full queue is 503; bad uploads (not an image, too large, a
decompression bomb, ...) are 4xx with a one-line JSON error. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import io
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from blip2 import Blip2Qformer, pipeline
from blip2.cli.main import main as blip2_main
from blip2.engine.index import ImageIndex, build_index, search
from blip2.serve import server as server_module
from blip2.serve import (DynamicBatcher, ModelService, QueueFullError, RequestError, ServerThread, ServeSettings,
                         create_app, decode_image)

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = httpx.Timeout(30.0)
SETTINGS = ServeSettings(max_batch_size=8, batch_window_ms=20, max_queue=64, max_upload_bytes=256 * 1024,
                         max_image_pixels=1_000_000)
LABELS = ["red circle", "blue square", "green triangle"]
QUERIES = ["a red circle", "a blue square on white", "green", "a photo of a yellow star"]


# --- data and servers ---------------------------------------------------------------------------------------------
def image_bytes(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def flat_jpeg(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros: a few KB on the wire, ``width * height`` bytes once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + one row
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def model() -> Blip2Qformer:
    torch.manual_seed(0)
    return Blip2Qformer.from_pretrained("blip2_tiny").eval()


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory, model) -> Path:
    """A real index (``build_index``) of 12 generated images of solid colours and noise."""
    root = tmp_path_factory.mktemp("serve_index")
    images = root / "images"
    images.mkdir()
    for i in range(12):
        (images / f"img_{i:02d}.png").write_bytes(image_bytes(100 + i, size=(36 + i, 30)))
    build_index(model, images, root / "index", batch_size=8, progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def server(model, index_folder):
    service = ModelService(model, index=ImageIndex.load(index_folder), model_name="blip2_tiny")
    with ServerThread(create_app(service, SETTINGS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        yield http


def assert_one_line_error(response: httpx.Response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert "\n" not in response.text and "\n" not in body["error"]
    assert match in body["error"], body["error"]


# --- answers equal the library's ----------------------------------------------------------------------------------
def test_healthz_names_the_model_the_index_and_the_queues(client) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["model"] == "blip2_tiny"
    assert health["index"]["images"] == 12
    assert set(health["queues"]) == {"embed_image", "embed_text", "classify", "caption", "search"}


def test_embed_equals_the_feature_extraction_pipeline(client, model) -> None:
    extract = pipeline("feature_extraction", model=model)
    image = Image.open(io.BytesIO(image_bytes(1)))
    got = client.post("/embed", files={"image": ("a.png", image_bytes(1), "image/png")}).json()
    assert got["kind"] == "image" and got["shape"] == [8, 32]
    torch.testing.assert_close(torch.tensor(got["embedding"]), extract(images=image), atol=1e-5, rtol=0)
    got = client.post("/embed", data={"text": "A red Circle!"}).json()
    assert got["kind"] == "text" and got["shape"] == [32]
    torch.testing.assert_close(torch.tensor(got["embedding"]), extract(texts="A red Circle!"), atol=1e-5, rtol=0)


def test_classify_equals_the_zero_shot_pipeline(client, model) -> None:
    classify = pipeline("zero_shot_image_classification", model=model, candidate_labels=LABELS)
    expected = classify(Image.open(io.BytesIO(image_bytes(2))))
    got = client.post("/classify", files={"image": ("a.png", image_bytes(2), "image/png")},
                      data={"labels": ",".join(LABELS)}).json()["labels"]
    assert [row["label"] for row in got] == [row["label"] for row in expected]
    assert [row["score"] for row in got] == pytest.approx([row["score"] for row in expected], abs=1e-5)
    top = client.post("/classify", files={"image": ("a.png", image_bytes(2), "image/png")},
                      data={"labels": LABELS, "top_k": "1"}).json()["labels"]  # repeated fields
    assert [row["label"] for row in top] == [expected[0]["label"]]


def test_caption_equals_the_qformer_generate(client, model) -> None:
    processor = pipeline("feature_extraction", model=model).processor
    pixels = processor(images=[Image.open(io.BytesIO(image_bytes(3)))])["pixel_values"]
    with torch.no_grad():
        expected = processor.batch_decode(model.generate(pixels))[0]
    got = client.post("/caption", files={"image": ("a.png", image_bytes(3), "image/png")}).json()
    assert got == {"caption": expected}


def test_search_equals_the_library_search(client, model, index_folder) -> None:
    processor = pipeline("feature_extraction", model=model).processor
    expected = search(model, processor, ImageIndex.load(index_folder), QUERIES, k=5)
    for query, hits in zip(QUERIES, expected):
        got = client.get("/search", params={"q": query, "k": 5}).json()
        assert got["query"] == query
        assert [hit["id"] for hit in got["results"]] == [hit["id"] for hit in hits]
        assert [hit["score"] for hit in got["results"]] == pytest.approx([hit["score"] for hit in hits], abs=1e-5)
        assert [hit["rank"] for hit in got["results"]] == [1, 2, 3, 4, 5]


def test_search_with_rerank_equals_the_library_rerank(client, model, index_folder) -> None:
    processor = pipeline("feature_extraction", model=model).processor
    expected = search(model, processor, ImageIndex.load(index_folder), QUERIES[0], k=4, rerank=True)[0]
    got = client.get("/search", params={"q": QUERIES[0], "k": 4, "rerank": 1}).json()["results"]
    assert [hit["id"] for hit in got] == [hit["id"] for hit in expected]
    for key in ("score", "itc", "itm"):
        assert [hit[key] for hit in got] == pytest.approx([hit[key] for hit in expected], abs=1e-5)
    plain = client.get("/search", params={"q": QUERIES[0], "k": 4}).json()["results"]
    assert [hit["score"] for hit in got] != pytest.approx([hit["score"] for hit in plain], abs=1e-5)
    assert_one_line_error(client.get("/search", params={"q": "x", "rerank": "yes"}), 422, "rerank")


def test_thumbnails_are_small_jpegs_of_index_rows_only(client) -> None:
    response = client.get("/thumbnail/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).format == "JPEG"
    assert_one_line_error(client.get("/thumbnail/12"), 404, "no index row '12'")
    assert_one_line_error(client.get("/thumbnail/-1"), 404, "no index row")
    assert client.get("/thumbnail/..%2F..%2Fetc%2Fpasswd").status_code == 404


def test_the_page_has_the_search_form(client) -> None:
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    for element in ('id="query"', 'id="search-form"', 'id="results"', "/search?"):
        assert element in response.text


# --- concurrency and batching -------------------------------------------------------------------------------------
def request_for(i: int) -> tuple[str, str, dict]:
    """The i-th of a mix over every endpoint: (method, path, httpx keyword arguments)."""
    image = {"image": (f"{i}.png", image_bytes(10 + i % 8), "image/png")}
    kind = i % 5
    if kind == 0:
        return "POST", "/embed", {"files": image}
    if kind == 1:
        return "POST", "/embed", {"data": {"text": f"picture number {i} of a thing"}}
    if kind == 2:
        return "POST", "/classify", {"files": image, "data": {"labels": ",".join(LABELS[: 2 + i % 2])}}
    if kind == 3:
        return "POST", "/caption", {"files": image}
    return "GET", "/search", {"params": {"q": QUERIES[i % len(QUERIES)], "k": 3 + i % 4}}


def assert_same_answer(got, expected, where: str) -> None:
    """Floats to 1e-5; strings, ids, ranks and shapes exactly."""
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_same_answer(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for index, (a, b) in enumerate(zip(got, expected)):
            assert_same_answer(a, b, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


async def fire_at_once(url: str, count: int) -> list[httpx.Response]:
    """``count`` requests on ``count`` connections, released together."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT, limits=limits) as http:
        gate = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            method, path, kwargs = request_for(i)
            await gate.wait()
            return await http.request(method, path, **kwargs)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)


def test_32_concurrent_requests_get_the_sequential_answers_and_are_batched(client, server) -> None:
    sequential = []
    for i in range(32):
        method, path, kwargs = request_for(i)
        response = client.request(method, path, **kwargs)
        assert response.status_code == 200, response.text
        sequential.append(response.json())
    before = client.get("/healthz").json()["queues"]
    concurrent = asyncio.run(fire_at_once(server.url, 32))
    for i, (response, expected) in enumerate(zip(concurrent, sequential)):
        assert response.status_code == 200, response.text
        assert_same_answer(response.json(), expected, f"request {i} {request_for(i)[1]}")
    after = client.get("/healthz").json()["queues"]
    requests = sum(after[name]["requests"] - before[name]["requests"] for name in after)
    batches = sum(after[name]["batches"] - before[name]["batches"] for name in after)
    assert requests == 32
    assert batches < requests, "32 requests at once ran as 32 forwards: nothing was batched"
    assert max(queue["largest_batch"] for queue in after.values()) > 1


def test_stage2_captions_with_mixed_prompts_batch_to_the_pipelines_answers(model, tmp_path) -> None:
    from llm_fixtures import tiny_llama, write_llama

    from blip2 import Blip2ImageToTextGeneration
    from blip2.models.base import init_bert_weights
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    llm_folder = write_llama(tiny_llama(), tmp_path / "llama")
    captioner = Blip2ImageToTextGeneration(tiny_config(text_config={"checkpoint_name_or_path": str(llm_folder),
                                                                    "seq_length": 40}))
    init_bert_weights(captioner.qformer, std=0.2)  # wide weights: at the usual scale every image captions alike
    with torch.no_grad():
        captioner.llm_proj.weight.mul_(20)
    captioner.eval()
    expected_pipeline = pipeline("image_to_text_generation", model=captioner, max_new_tokens=8)
    prompts = [None, "a", "a photo of", None, "what is it", "b", None, "c d"]
    expected = [expected_pipeline(Image.open(io.BytesIO(image_bytes(30 + i))), prompt=prompt)["generated_text"]
                for i, prompt in enumerate(prompts)]
    service = ModelService(model, caption_model=captioner, caption_settings={"max_new_tokens": 8})
    with ServerThread(create_app(service, ServeSettings(batch_window_ms=50))) as running:
        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as http:
                def call(i: int, prompt: str | None):
                    return http.post("/caption", files={"image": ("a.png", image_bytes(30 + i), "image/png")},
                                     data={"prompt": prompt} if prompt else None)

                answers = await asyncio.wait_for(asyncio.gather(*map(call, range(8), prompts)), 60)
                health = (await http.get("/healthz")).json()
                # a prompt too long for seq_length 40 fails its batch; rerun one by one, only it fails
                mixed = await asyncio.wait_for(asyncio.gather(call(0, None), call(8, "word " * 40), call(2, "a")), 60)
                return answers, health, mixed

        answers, health, mixed = asyncio.run(scenario())
    assert [response.json() for response in answers] == [{"caption": text} for text in expected]
    assert health["caption_model"] == "stage-2" and health["queues"]["caption"]["largest_batch"] > 1
    assert mixed[0].json() == {"caption": expected[0]} and mixed[2].status_code == 200
    assert_one_line_error(mixed[1], 422, "the prompt is too long")


# --- the queue bound ----------------------------------------------------------------------------------------------
def held_text_batches(model):
    """A service whose text batches wait for ``release`` once they start (``started``); ``seen`` lists their items."""
    service = ModelService(model)
    started, release, seen = threading.Event(), threading.Event(), []
    embed = service.embed_text_batch

    def held(items):
        seen.extend(items)
        started.set()
        assert release.wait(30), "never released"
        return embed(items)

    service.embed_text_batch = held
    return service, started, release, seen


def test_a_full_queue_is_503_and_the_queued_requests_still_finish(model) -> None:
    service, started, release, _ = held_text_batches(model)
    settings = ServeSettings(max_batch_size=1, max_queue=1)
    with ServerThread(create_app(service, settings)) as running:
        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as http:
                first = asyncio.create_task(http.post("/embed", data={"text": "one"}))
                assert await asyncio.to_thread(started.wait, 30)  # the first is in the forward, the queue empty
                second = asyncio.create_task(http.post("/embed", data={"text": "two"}))
                for _ in range(300):  # until the second waits in the queue (3 s at most)
                    if (await http.get("/healthz")).json()["queues"]["embed_text"]["waiting"] == 1:
                        break
                    await asyncio.sleep(0.01)
                third = await http.post("/embed", data={"text": "three"})
                release.set()
                return third, await asyncio.wait_for(first, 30), await asyncio.wait_for(second, 30)

        try:
            third, first, second = asyncio.run(scenario())
        finally:
            release.set()
    assert_one_line_error(third, 503, "server busy")
    assert third.headers["retry-after"] == "1"
    assert first.status_code == 200 and second.status_code == 200


def test_a_request_not_answered_in_time_is_504_and_is_dropped_from_the_queue(model) -> None:
    service, started, release, seen = held_text_batches(model)
    settings = ServeSettings(max_batch_size=1, request_timeout_s=0.5)
    with ServerThread(create_app(service, settings)) as running:
        async def scenario():
            async with httpx.AsyncClient(base_url=running.url, timeout=TIMEOUT) as http:
                first = asyncio.create_task(http.post("/embed", data={"text": "one"}))
                assert await asyncio.to_thread(started.wait, 30)
                second = await http.post("/embed", data={"text": "two"})  # waits in the queue past its timeout
                release.set()
                return await asyncio.wait_for(first, 30), second, (await http.post("/embed", data={"text": "3"}))

        try:
            first, second, third = asyncio.run(scenario())
        finally:
            release.set()
    assert_one_line_error(first, 504, "no answer within 0.5 s")  # held in its forward past the limit
    assert_one_line_error(second, 504, "no answer within 0.5 s")
    assert third.status_code == 200
    assert seen == ["one", "3"]  # "two" timed out in the queue and never ran


# --- bad requests -------------------------------------------------------------------------------------------------
BAD_UPLOADS = [
    ("not an image", ("a.png", b"GIF89a? no, just text", "image/png"), 415, "not an image"),
    ("a text content type", ("a.txt", b"hello", "text/plain"), 415, "content type 'text/plain' is not an image"),
    ("a truncated PNG", ("a.png", image_bytes(4)[:120], "image/png"), 400, "corrupt or truncated"),
    ("an empty file", ("a.png", b"", "image/png"), 400, "empty"),
    ("too many pixels", ("big.jpg", flat_jpeg((1100, 1000)), "image/jpeg"), 413,
     "1100x1000 = 1100000 pixels, over the limit of 1000000"),
    ("a decompression bomb", ("bomb.png", png_bomb(4000, 4000), "image/png"), 413, "4000x4000 = 16000000 pixels"),
    ("an EPS file (Ghostscript)", ("a.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
                                   "application/octet-stream"), 415, "not an image"),
]


@pytest.mark.parametrize("endpoint", ["/embed", "/caption", "/classify"])
@pytest.mark.parametrize("name, upload, status, match", BAD_UPLOADS, ids=[case[0] for case in BAD_UPLOADS])
def test_bad_uploads_are_4xx_with_one_line(client, endpoint, name, upload, status, match) -> None:
    data = {"labels": "a,b"} if endpoint == "/classify" else None
    assert_one_line_error(client.post(endpoint, files={"image": upload}, data=data), status, match)


def test_an_upload_over_the_size_limit_is_413_before_it_is_read(client) -> None:
    noise = image_bytes(6, size=(300, 300))  # ~270 KB of PNG noise, over the test server's 256 KiB
    assert len(noise) > SETTINGS.max_upload_bytes
    assert_one_line_error(client.post("/embed", files={"image": ("n.png", noise, "image/png")}), 413,
                          f"over the limit of {SETTINGS.max_upload_bytes} bytes")

    big = b"\xff\xd8" + bytes(4 * 2**20)  # 4 MiB: far more than the socket buffers hold, so unless the server
    response = client.post("/embed", files={"image": ("big.jpg", big, "image/jpeg")})  # drains, the client sees a reset
    assert_one_line_error(response, 413, f"over the limit of {SETTINGS.max_upload_bytes} bytes")

    def chunks():  # chunked transfer: no Content-Length, so the limit is enforced while reading
        for _ in range(64):
            yield b"x" * 16384

    response = client.post("/embed", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_one_line_error(response, 413, "upload too large: more than")
    assert client.get("/healthz").status_code == 200  # the server is fine afterwards


@pytest.mark.parametrize("method, path, kwargs, status, match", [
    ("POST", "/embed", {"data": {"other": "x"}}, 422, "exactly one of image"),
    ("POST", "/embed", {"files": {"image": ("a.png", image_bytes(7), "image/png")}, "data": {"text": "x"}}, 422,
     "exactly one of image"),
    ("POST", "/embed", {}, 415, "got no Content-Type"),
    ("POST", "/embed", {"json": {"text": "hi"}}, 415, "multipart/form-data"),
    ("POST", "/embed", {"data": {"image": "not a file"}}, 422, "image: must be a file upload"),
    ("POST", "/embed", {"data": {"text": "x" * 1001}}, 422, "text: 1001 characters, over the limit of 1000"),
    ("POST", "/classify", {"files": {"image": ("a.png", image_bytes(7), "image/png")}}, 422, "labels: required"),
    ("POST", "/classify", {"files": {"image": ("a.png", image_bytes(7), "image/png")},
                           "data": {"labels": "a,b", "top_k": "3"}}, 422, "top_k: 3 must be between 1 and 2"),
    ("POST", "/classify", {"files": {"image": ("a.png", image_bytes(7), "image/png")},
                           "data": {"labels": "a,a"}}, 422, "each label may appear once"),
    ("POST", "/classify", {"files": {"image": ("a.png", image_bytes(7), "image/png")},
                           "data": {"labels": "a,b", "template": "{0} {1}"}}, 422, "template:"),
    ("POST", "/caption", {"files": {"image": ("a.png", image_bytes(7), "image/png")}, "data": {"prompt": "a"}},
     422, "needs a stage-2 caption model"),
    ("GET", "/search", {"params": {"q": "", "k": 3}}, 422, "q: required"),
    ("GET", "/search", {"params": {"q": "dog", "k": "many"}}, 422, "k: 'many' is not an integer"),
    ("GET", "/search", {"params": {"q": "dog", "k": 101}}, 422, "k: 101 must be between 1 and 100"),
    ("GET", "/nowhere", {}, 404, "Not Found: GET /nowhere"),
    ("DELETE", "/embed", {}, 405, "Method Not Allowed"),
])
def test_bad_requests_are_4xx_with_one_line(client, method, path, kwargs, status, match) -> None:
    assert_one_line_error(client.request(method, path, **kwargs), status, match)


def test_search_without_an_index_is_404(model) -> None:
    with ServerThread(create_app(ModelService(model), SETTINGS)) as running:
        response = httpx.get(f"{running.url}/search", params={"q": "dog"}, timeout=TIMEOUT)
        thumbnail = httpx.get(f"{running.url}/thumbnail/0", timeout=TIMEOUT)
    assert_one_line_error(response, 404, "no index is loaded")
    assert_one_line_error(thumbnail, 404, "no index row '0' (the index has 0 images)")


def test_an_index_of_another_model_is_refused_and_a_vanished_image_has_no_thumbnail(model, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"{i}.png").write_bytes(image_bytes(i))
    build_index(model, images, tmp_path / "index", progress=False)
    torch.manual_seed(1)
    with pytest.raises(ValueError, match="was built with model blip2_tiny"):
        ModelService(Blip2Qformer.from_pretrained("blip2_tiny"), index=ImageIndex.load(tmp_path / "index"))
    (images / "1.png").unlink()
    service = ModelService(model, index=ImageIndex.load(tmp_path / "index"))
    with ServerThread(create_app(service, SETTINGS)) as running:
        response = httpx.get(f"{running.url}/thumbnail/1", timeout=TIMEOUT)
    assert_one_line_error(response, 404, "index row 1 (1.png) cannot be read any more")
    assert str(tmp_path) not in response.text  # no server path in the answer


def test_decode_image_refuses_a_bomb_at_the_default_limit_from_its_header() -> None:
    bomb = png_bomb(8000, 8000)  # 64 M pixels in ~60 KB
    assert len(bomb) < 100_000
    start = time.perf_counter()
    with pytest.raises(RequestError, match="8000x8000 = 64000000 pixels, over the limit of 40000000") as info:
        decode_image(bomb, ServeSettings().max_image_pixels)
    assert info.value.status == 413 and time.perf_counter() - start < 1.0  # refused without decoding
    assert decode_image(image_bytes(8, fmt="JPEG"), 10_000).size == (40, 30)


# --- the batcher on its own ---------------------------------------------------------------------------------------
def run_batcher(run_batch, items, **kwargs):
    """Submit ``items`` at once to a fresh batcher; (results or exceptions, the batcher)."""
    async def scenario():
        executor = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
        batcher = DynamicBatcher("test", run_batch, executor, **kwargs)
        batcher.start()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(item, timeout=10) for item in items), return_exceptions=True), 20)
        finally:
            await batcher.stop()
            executor.shutdown()
        return results, batcher

    return asyncio.run(scenario())


def test_the_batcher_collects_up_to_max_batch_size_and_keeps_the_order() -> None:
    sizes = []

    def double(items):
        sizes.append(len(items))
        return [2 * item for item in items]

    results, batcher = run_batcher(double, list(range(10)), max_batch_size=4, window_ms=50, max_queue=16)
    assert results == [2 * i for i in range(10)]
    assert sizes == [4, 4, 2] and batcher.stats.batches == 3 and batcher.stats.largest_batch == 4


def test_max_batch_size_one_runs_every_item_alone() -> None:
    sizes = []
    results, _ = run_batcher(lambda items: sizes.append(len(items)) or items, list(range(6)), max_batch_size=1,
                             window_ms=50, max_queue=16)
    assert results == list(range(6)) and sizes == [1] * 6


def test_a_failing_item_fails_only_its_own_request() -> None:
    def picky(items):
        if 3 in items:
            raise ValueError("three is bad")
        return items

    results, _ = run_batcher(picky, list(range(6)), max_batch_size=8, window_ms=50, max_queue=16)
    assert isinstance(results[3], ValueError) and str(results[3]) == "three is bad"
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4, 5]


def test_the_batcher_queue_is_bounded() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(items):
        started.set()
        release.wait(10)
        return items

    async def scenario():
        executor = __import__("concurrent.futures").futures.ThreadPoolExecutor(1)
        batcher = DynamicBatcher("test", slow, executor, max_batch_size=1, max_queue=2)
        batcher.start()
        try:
            running = [asyncio.create_task(batcher.submit(0, timeout=10))]
            assert await asyncio.to_thread(started.wait, 10)  # 0 is in the forward
            running += [asyncio.create_task(batcher.submit(i, timeout=10)) for i in (1, 2)]
            await asyncio.sleep(0.05)
            assert batcher.waiting == 2
            with pytest.raises(QueueFullError, match="2 requests are waiting"):
                await batcher.submit(99)
            release.set()
            return await asyncio.wait_for(asyncio.gather(*running), 10)
        finally:
            release.set()
            await batcher.stop()
            executor.shutdown()

    assert asyncio.run(scenario()) == [0, 1, 2]


# --- the command --------------------------------------------------------------------------------------------------
def test_blip2_serve_builds_the_app_it_is_asked_for(monkeypatch, index_folder) -> None:
    served = {}
    monkeypatch.setattr(server_module, "serve_forever", lambda app, **kwargs: served.update(app=app, **kwargs))
    code = blip2_main(["serve", "--index", str(index_folder), "--port", "8123",  # the model: the index's
                          "--max_batch_size", "4", "--max_upload_mb", "1", "--device", "cpu"])
    assert code == 0 and served["host"] == "127.0.0.1" and served["port"] == 8123
    with ServerThread(served["app"]) as running:
        health = httpx.get(f"{running.url}/healthz", timeout=TIMEOUT).json()
    assert health["model"] == "blip2_tiny" and health["index"]["images"] == 12
    assert health["batching"]["max_batch_size"] == 4


@pytest.mark.parametrize("argv, match", [
    (["--model", "blip2_tiny", "--max_batch_size", "0"], "max_batch_size=0 must be an int >= 1"),
    (["--model", "blip2_tiny", "--port", "70000"], "--port 70000 must be between 1 and 65535"),
    (["--model", "blip2_tiny", "--index", "no_such_index"], "index folder no_such_index does not exist"),
    (["--seed", "1", "--index", "INDEX"], "was built with model blip2_tiny"),
    ([], "--model is required"),
])
def test_blip2_serve_refuses_bad_options_in_one_line(capsys, monkeypatch, index_folder, argv, match) -> None:
    monkeypatch.setattr(server_module, "serve_forever", lambda app, **kwargs: pytest.fail("must not serve"))
    argv = [str(index_folder) if arg == "INDEX" else arg for arg in argv]
    assert blip2_main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blip2: error:") and "\n" not in err and match in err, err


def test_the_blip2_command_works_without_the_web_stack_and_serve_says_what_to_install() -> None:
    blocked = "import sys; sys.modules.update(dict.fromkeys(['fastapi', 'uvicorn', 'starlette', 'multipart']))"
    code = f"{blocked}; from blip2.cli.main import main; sys.exit(main(['serve', '--model', 'blip2_tiny']))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "blip2: error: blip2 serve needs fastapi, uvicorn and python-multipart (import of fastapi halted; None in "
        "sys.modules): pip install 'blip2[serve]'"]
