"""What an upload must pass before it reaches the model: a body size cap enforced while the body streams in, a
content type, a known image format, and a pixel count read from the image header before anything is decoded.

Every refusal is a ``RequestError`` (an HTTP status and one line); ``blip2.serve.app`` turns it into
``{"error": "<line>"}``.
"""

from __future__ import annotations

import io
import json

from PIL import Image, UnidentifiedImageError

from blip2.processing.image import load_image

# formats Pillow decodes itself; others (EPS runs Ghostscript, for one) are refused before any plugin sees the bytes
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
# content types an image part may declare: image/*, or none in particular (curl's default for unknown extensions)
GENERIC_CONTENT_TYPES = ("", "application/octet-stream")
DRAIN_BYTES = 32 * 2**20  # of a refused body, read and dropped so the client gets the 413 (see BodySizeLimit)


class RequestError(Exception):
    """A request the server refuses: ``status`` (4xx/5xx) and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = one_line(message)


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def check_content_type(content_type: str | None, field: str = "image") -> None:
    """An image part must declare ``image/...`` or nothing specific; anything else is 415."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind in GENERIC_CONTENT_TYPES:
        return
    raise RequestError(415, f"{field}: content type {kind!r} is not an image (send image/jpeg, image/png, "
                            f"image/webp, image/gif or image/bmp)")


def decode_image(data: bytes, max_pixels: int, field: str = "image") -> Image.Image:
    """The RGB image in ``data``; its size is checked against ``max_pixels`` from the header, before decoding.

    415: not an image in one of ``IMAGE_FORMATS``; 413: more than ``max_pixels`` pixels (a decompression bomb is a
    small file with a huge header size, so it stops here); 400: the header is fine but the data does not decode.
    """
    if not data:
        raise RequestError(400, f"{field}: the upload is empty")
    try:
        # reads the header only; Pillow's own bomb check (2x Image.MAX_IMAGE_PIXELS) may already refuse it here
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(415, f"{field}: not an image (expected {', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as err:
        raise RequestError(413, f"{field}: image too large (decompression bomb): {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RequestError(400, f"{field}: cannot read the image header ({err})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(413, f"{field}: image is {width}x{height} = {width * height} pixels, over the limit of "
                                f"{max_pixels} pixels")
    if width < 1 or height < 1:
        raise RequestError(400, f"{field}: image is {width}x{height}")
    try:
        image.load()
        return load_image(image)  # RGB as everywhere else
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise RequestError(400, f"{field}: corrupt or truncated image ({err})") from None


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 and never held in memory.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is kept; otherwise the body is
    read chunk by chunk and the request refused as soon as the running total passes the limit (chunked uploads
    declare no length). Before the 413 goes out, up to ``drain_bytes`` more of the body are read and dropped: a
    server that closes a socket with unread data makes the kernel reset the connection, and the client would see
    "connection reset" instead of the 413. A body within the limit is handed to the app unchanged.
    """

    def __init__(self, app, max_bytes: int, drain_bytes: int = DRAIN_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(receive, send, f"{int(declared)} bytes", more_body=True)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                chunks.clear()
                await self.refuse(receive, send, f"more than {self.max_bytes} bytes", message.get("more_body"))
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)

    async def refuse(self, receive, send, size: str, more_body: bool) -> None:
        drained = 0
        while more_body and drained <= self.drain_bytes:
            message = await receive()
            drained += len(message.get("body", b""))
            more_body = message["type"] == "http.request" and message.get("more_body", False)
        body = json.dumps({"error": f"upload too large: {size}, over the limit of {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` as one message, then defers to ``receive`` (for the disconnect)."""
    sent = False

    async def receive_again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
