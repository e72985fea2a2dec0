"""The search page of ``blip2 serve`` in a real headless browser (Debian's Chromium, driven by playwright): load
``/``, type a query, submit, and see the thumbnails, the first being the library's first result
(``blip2.engine.index.search``).

Skips only when no browser can be started: neither ``/usr/bin/chromium`` (``scripts/test`` installs it) nor a
browser of playwright's own.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from blip2 import Blip2Qformer, pipeline
from blip2.engine.index import ImageIndex, build_index, search
from blip2.serve import ModelService, ServerThread, ServeSettings, create_app

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                                                    "-e '.[test]')")
pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
QUERIES = ["a red picture", "a dog"]  # different first results (checked in the test)
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def model() -> Blip2Qformer:
    """blip2_tiny with unit-gain random weights: at its own init (std 0.02) every query ranks the images the same
    way, and a page that sent the wrong query would still pass."""
    torch.manual_seed(0)
    model = Blip2Qformer.from_pretrained("blip2_tiny").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() >= 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def index(tmp_path_factory, model) -> ImageIndex:
    root = tmp_path_factory.mktemp("browser_index")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        colour = rng.integers(0, 256, size=3)
        pixels = np.clip(colour + rng.normal(0, 40, size=(30 + i, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"photo_{i:02d}.png")
    build_index(model, images, root / "index", batch_size=12, progress=False)
    return ImageIndex.load(root / "index")


@pytest.fixture(scope="module")
def server(model, index):
    with ServerThread(create_app(ModelService(model, index=index), ServeSettings())) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, else playwright's own; the test skips, saying why, only when neither starts."""
    failures = []
    with playwright_api.sync_playwright() as driver:
        candidates = ([{"executable_path": CHROMIUM}] if os.path.exists(CHROMIUM) else []) + [{}]
        for options in candidates:
            try:
                launched = driver.chromium.launch(args=CHROMIUM_ARGS, timeout=TIMEOUT_MS, **options)
            except Exception as error:  # noqa: BLE001 - any launch failure means: try the next, then skip
                failures.append(f"{options.get('executable_path', 'playwright chromium')}: "
                                f"{str(error).strip().splitlines()[0]}")
                continue
            yield launched
            launched.close()
            return
        if not os.path.exists(CHROMIUM):
            failures.insert(0, f"{CHROMIUM}: not installed (apt-get install chromium)")
        pytest.skip("no browser could be started: " + "; ".join(failures))


def expected_ids(model, index: ImageIndex, k: int) -> list[list[str]]:
    processor = pipeline("feature_extraction", model=model).processor
    return [[hit["id"] for hit in hits] for hits in search(model, processor, index, QUERIES, k=k)]


def test_the_page_searches_and_shows_the_librarys_first_result(browser, server, model, index) -> None:
    expected = expected_ids(model, index, k=5)
    assert expected[0][0] != expected[1][0], "pick queries whose first results differ"
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server.url + "/")
        playwright_api.expect(page.locator("#status")).to_contain_text("12 images indexed")
        for query, ids in zip(QUERIES, expected):
            page.fill("#query", query)
            page.fill("#k", "5")
            page.click("#go")
            results = page.locator("#results[data-state='done'] figure.result")
            playwright_api.expect(results).to_have_count(5)
            assert results.first.get_attribute("data-id") == ids[0]
            assert [results.nth(i).get_attribute("data-id") for i in range(5)] == ids
            thumbnail = results.first.locator("img")
            playwright_api.expect(thumbnail).to_have_attribute("src", f"/thumbnail/{index.ids.index(ids[0])}")
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
        assert page.locator("#error").inner_text() == ""
    finally:
        page.close()


def test_the_page_shows_a_server_error_in_one_line(browser, server) -> None:
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(server.url + "/")
        page.fill("#query", "x" * 1001)  # over the server's max_text_chars
        page.click("#go")
        playwright_api.expect(page.locator("#error")).to_have_text("q: 1001 characters, over the limit of 1000")
        assert page.locator("#results figure").count() == 0
    finally:
        page.close()
