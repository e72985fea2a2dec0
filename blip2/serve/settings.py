"""The server's knobs (``blip2 serve`` options), in a module of their own: the command line reads the defaults from
here without importing FastAPI, which is an optional dependency (``pip install 'blip2[serve]'``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    """The server's knobs: batching, queue and request limits."""

    max_batch_size: int = 16  # requests per forward; 1 turns batching off
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting per endpoint; one more is answered 503
    max_upload_bytes: int = 10 * 2**20  # a request body over this is 413, refused while it streams in
    max_image_pixels: int = 40_000_000  # width x height from the image header; over it is 413, before decoding
    request_timeout_s: float = 120.0  # a request not answered by then is 504
    max_labels: int = 100  # candidate labels per /classify request
    max_text_chars: int = 1000  # characters of a text, query, label, template or prompt
    max_k: int = 100  # results per /search request

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_upload_bytes", "max_image_pixels", "max_labels",
                     "max_text_chars", "max_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 1")
        if self.batch_window_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError(f"batch_window_ms={self.batch_window_ms} must be >= 0 and "
                             f"request_timeout_s={self.request_timeout_s} > 0")
