"""The shared pytest fixtures (every fixture more than one test module uses lives here). Plain helpers are in
``helpers.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2.config import Blip2Config
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): on tiny tensors more
    intra-op threads only add overhead, and a lot of it when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config() -> Blip2Config:
    return tiny_config()


@pytest.fixture(scope="module")
def arrays() -> list[np.ndarray]:
    """Three uint8 HWC images of different sizes (none square, so the resize matters)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((40, 30, 3), (28, 52, 3), (64, 48, 3))]


@pytest.fixture(scope="module")
def llama():
    """A random tiny LlamaForCausalLM (``llm_fixtures.tiny_llama``), one per test module."""
    from llm_fixtures import tiny_llama

    return tiny_llama()
