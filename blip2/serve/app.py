"""The HTTP app: ``create_app(service, settings)`` -> a FastAPI app serving ``blip2.serve.service.ModelService``.

    GET  /healthz              status, model, index size, queue lengths and batch counts
    POST /embed                form: image=<file> or text=<str> -> {"kind", "shape", "embedding"}
    POST /classify             form: image=<file>, labels=<str> (repeated, or one comma-separated), template, top_k
    POST /caption              form: image=<file> (prompt=<str> with a stage-2 caption model)
    GET  /search?q=...&k=10    the index's best images for a text query -> {"query", "results": [...]}
                               (&rerank=1: the top k re-scored by ITC + ITM, as ``blip2 search --rerank``)
    GET  /thumbnail/{row}      a small JPEG of one index row
    GET  /                     the search page

Model requests go through one ``DynamicBatcher`` per endpoint (a full queue is 503). Every error is
``{"error": "<one line>"}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip2.processing import ImageLoadError
from blip2.processing import prompts as prompting
from blip2.serve.batching import DynamicBatcher, QueueFullError
from blip2.serve.limits import BodySizeLimit, RequestError, check_content_type, decode_image, one_line
from blip2.serve.service import CaptionItem, ClassifyItem, ModelService, SearchItem
from blip2.serve.settings import ServeSettings

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class Server:
    """What the routes share: the service, the settings, the model's worker thread and the batchers."""

    def __init__(self, service: ModelService, settings: ServeSettings) -> None:
        self.service = service
        self.settings = settings
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.batchers: dict[str, DynamicBatcher] = {}

    def start(self) -> None:
        """Start the model's single worker thread and one batcher per endpoint (on the running loop)."""
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-model")
        s, service = self.settings, self.service
        jobs = {"embed_image": service.embed_image_batch, "embed_text": service.embed_text_batch,
                "classify": service.classify_batch, "caption": service.caption_batch}
        if service.index is not None:
            jobs["search"] = service.search_batch
        self.batchers = {name: DynamicBatcher(name, job, self.executor, s.max_batch_size, s.batch_window_ms,
                                              s.max_queue) for name, job in jobs.items()}
        for batcher in self.batchers.values():
            batcher.start()

    async def stop(self) -> None:
        for batcher in self.batchers.values():
            await batcher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    async def run(self, name: str, item: Any) -> Any:
        """The item's answer from its endpoint's batcher. A ValueError is about this item's input (a batch that
        fails is rerun item by item, so the error reaches only the request that caused it): 422."""
        try:
            return await self.batchers[name].submit(item, timeout=self.settings.request_timeout_s)
        except ValueError as error:
            raise RequestError(422, str(error)) from None

    def health(self) -> dict[str, Any]:
        service, index = self.service, self.service.index
        return {
            "status": "ok", "model": service.model_name,
            "caption_model": "stage-2" if service.captioner is not None else "stage-1 Q-Former LM head",
            "index": None if index is None else {"images": len(index), "model": index.model_name},
            "batching": {"max_batch_size": self.settings.max_batch_size,
                         "batch_window_ms": self.settings.batch_window_ms, "max_queue": self.settings.max_queue},
            "queues": {name: {"waiting": b.waiting, "requests": b.stats.requests, "batches": b.stats.batches,
                              "largest_batch": b.stats.largest_batch} for name, b in self.batchers.items()},
        }


def server_of(request: Request) -> Server:
    return request.app.state.server


# --- reading requests ---------------------------------------------------------------------------------------------
async def read_form(request: Request) -> FormData:
    """The request's form (multipart or urlencoded); other bodies are 415."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in FORM_TYPES:
        got = f"got {kind}" if kind else "got no Content-Type"
        raise RequestError(415, f"send the fields as multipart/form-data (curl -F name=value), {got}")
    settings = server_of(request).settings
    # text fields are checked one by one below; the body as a whole is capped by BodySizeLimit already
    return await request.form(max_files=1, max_fields=settings.max_labels + 8,
                              max_part_size=settings.max_upload_bytes)


def text_field(form: FormData | Any, name: str, limit: int, required: bool = False) -> str | None:
    value = form.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RequestError(422, f"{name}: required")
        return None
    if not isinstance(value, str):
        raise RequestError(422, f"{name}: must be a text field, not a file")
    if len(value) > limit:
        raise RequestError(422, f"{name}: {len(value)} characters, over the limit of {limit}")
    return value


def int_field(form: FormData | Any, name: str, default: int | None, low: int, high: int) -> int | None:
    value = text_field(form, name, 32)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise RequestError(422, f"{name}: {value!r} is not an integer") from None
    if not low <= number <= high:
        raise RequestError(422, f"{name}: {number} must be between {low} and {high}")
    return number


async def read_image(request: Request, form: FormData, pixels_of) -> Any:
    """The form's ``image`` upload, checked (``blip2.serve.limits``) and preprocessed by ``pixels_of`` (in a thread,
    off the event loop)."""
    upload = form.get("image")
    if upload is None:
        raise RequestError(422, "image: required (a file field: curl -F image=@photo.jpg)")
    if not isinstance(upload, UploadFile):
        raise RequestError(422, "image: must be a file upload, not a text field")
    check_content_type(upload.content_type)
    data = await upload.read()
    max_pixels = server_of(request).settings.max_image_pixels
    return await run_in_threadpool(lambda: pixels_of(decode_image(data, max_pixels)))


def labels_field(form: FormData, settings: ServeSettings) -> tuple[str, ...]:
    """``labels``: repeated fields, or one field of comma-separated labels."""
    values = [value for value in form.getlist("labels") if isinstance(value, str)]
    if len(values) == 1:
        values = values[0].split(",")
    labels = tuple(label.strip() for label in values if label.strip())
    if not labels:
        raise RequestError(422, "labels: required (repeat the field, or give one comma-separated list)")
    if len(labels) > settings.max_labels or max(map(len, labels)) > settings.max_text_chars:
        raise RequestError(422, f"labels: at most {settings.max_labels} labels of {settings.max_text_chars} "
                                "characters each")
    if len(set(labels)) != len(labels):
        raise RequestError(422, "labels: each label may appear once")
    return labels


# --- routes -------------------------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    return server_of(request).health()


@router.post("/embed")
async def embed(request: Request) -> dict[str, Any]:
    """image=<file>: (Q, E) query features; text=<str>: an (E,) text feature. Both normalized."""
    server, form = server_of(request), await read_form(request)
    text = text_field(form, "text", server.settings.max_text_chars)
    if (text is None) == (form.get("image") is None):
        raise RequestError(422, "give exactly one of image (a file) and text")
    if text is not None:
        embedding = await server.run("embed_text", text)
        return {"kind": "text", "shape": [len(embedding)], "embedding": embedding}
    embedding = await server.run("embed_image", await read_image(request, form, server.service.pixels))
    return {"kind": "image", "shape": [len(embedding), len(embedding[0])], "embedding": embedding}


@router.post("/classify")
async def classify(request: Request) -> dict[str, Any]:
    """image=<file> and labels: the labels ranked by zero-shot probability, ``[{"label", "score"}]``."""
    server, form = server_of(request), await read_form(request)
    settings = server.settings
    labels = labels_field(form, settings)
    template = text_field(form, "template", settings.max_text_chars) or prompting.DEFAULT_TEMPLATE
    try:
        prompting.check_template(template)
    except ValueError as err:
        raise RequestError(422, f"template: {err}") from None
    top_k = int_field(form, "top_k", None, 1, len(labels))
    pixels = await read_image(request, form, server.service.pixels)
    ranked = await server.run("classify", ClassifyItem(pixels, labels, template, top_k))
    return {"labels": ranked}


@router.post("/caption")
async def caption(request: Request) -> dict[str, Any]:
    """image=<file>: a caption; prompt=<str> continues a prompt (stage-2 caption model only)."""
    server, form = server_of(request), await read_form(request)
    prompt = text_field(form, "prompt", server.settings.max_text_chars)
    if prompt is not None and server.service.captioner is None:
        raise RequestError(422, "prompt: needs a stage-2 caption model (blip2 serve --caption_model ...); the "
                                "stage-1 Q-Former captions without a prompt")
    pixels = await read_image(request, form, server.service.caption_pixels)
    return {"caption": await server.run("caption", CaptionItem(pixels, prompt))}


@router.get("/search")
async def search(request: Request) -> dict[str, Any]:
    """q=<query>&k=<n>[&rerank=1]: the index's best n images, ``[{"rank", "id", "row", "score", "thumbnail"}]``
    (with rerank also "itc" and "itm": score = itc + itm)."""
    server = server_of(request)
    if server.service.index is None:
        raise RequestError(404, "no index is loaded: start the server with blip2 serve --index <folder>")
    params = request.query_params
    query = text_field(params, "q", server.settings.max_text_chars, required=True)
    k = int_field(params, "k", 10, 1, server.settings.max_k)
    rerank = int_field(params, "rerank", 0, 0, 1) == 1
    results = await server.run("search", SearchItem(query, min(k, len(server.service.index)), rerank))
    return {"query": query, "results": results}


@router.get("/thumbnail/{row}")
async def thumbnail(request: Request, row: str) -> Response:
    service = server_of(request).service
    size = len(service.index) if service.index is not None else 0
    if not row.isdigit() or int(row) >= size:
        raise RequestError(404, f"no index row {row!r} (the index has {size} images)")
    try:
        jpeg = await run_in_threadpool(service.thumbnail, int(row))
    except ImageLoadError as error:  # moved or deleted since the index was built
        log.warning("thumbnail of row %s: %s", row, error)  # the path stays in the log, not in the answer
        raise RequestError(404, f"index row {row} ({service.index.ids[int(row)]}) cannot be read any more") from None
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


# --- errors -------------------------------------------------------------------------------------------------------
def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message) or "error"}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": "<one line>"}``."""

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.message)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, error: QueueFullError) -> JSONResponse:
        return error_response(503, f"server busy: {error}", {"Retry-After": "1"})

    @app.exception_handler(asyncio.TimeoutError)
    async def timed_out(request: Request, error: asyncio.TimeoutError) -> JSONResponse:
        limit = server_of(request).settings.request_timeout_s
        return error_response(504, f"no answer within {limit} s; the server is overloaded")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{error.detail}: {request.method} {request.url.path}" if error.status_code in (404, 405) \
            else str(error.detail)
        return error_response(error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}")


def create_app(service: ModelService, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``service``; the batchers start and stop with the app (its lifespan)."""
    server = Server(service, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="blip2 serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    app.include_router(router)
    add_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=server.settings.max_upload_bytes)
    return app
