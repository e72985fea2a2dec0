"""Running the app with uvicorn: in the foreground (``blip2 serve``), or on a background thread with a free loopback
port (tests and the benchmark), started and stopped with bounded waits."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


def serve_forever(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` until Ctrl-C (uvicorn's own signal handling)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


class ServerThread:
    """``app`` served by uvicorn on its own thread and event loop, on a free port of ``host``.

        with ServerThread(app) as server:
            httpx.get(f"{server.url}/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted connections only when the listening socket
        # says TCP, and without it Nagle + delayed ACKs hold every keep-alive answer ~40 ms
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.bind((host, 0))  # bound here, so the port is known and nobody else takes it
        self.host, self.port = self.socket.getsockname()[:2]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5,
                                                    backlog=256))
        self.thread = threading.Thread(target=self.run, name=f"uvicorn-{self.port}", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self) -> None:
        # uvicorn listens for signals only on the main thread, so Ctrl-C stays with the caller
        try:
            asyncio.run(self.server.serve(sockets=[self.socket]))
        except BaseException as error:  # noqa: BLE001 - reported by start()
            self.error = error

    def start(self, timeout: float = START_TIMEOUT_S) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start within {timeout} s: {self.error!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.socket.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the server thread did not stop within {timeout} s")

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
