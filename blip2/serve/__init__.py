"""``blip2 serve``: a stage-1 model (and optionally a stage-2 caption model and an image index) over HTTP.

``create_app(ModelService(model, index=...), ServeSettings(...))`` builds the FastAPI app (``app``); requests are
batched dynamically (``batching``), uploads checked before decoding (``limits``), and the model work lives in
``service``. ``server.ServerThread`` runs an app on a free loopback port for tests and benchmarks.

FastAPI, uvicorn and python-multipart are optional (``pip install 'blip2[serve]'``): the names below are imported
when first used, so ``import blip2.serve.settings`` (what the command line needs to list its options) works without
them.
"""

from __future__ import annotations

import importlib

EXPORTS = {
    "ServeSettings": "blip2.serve.settings",
    "create_app": "blip2.serve.app",
    "DynamicBatcher": "blip2.serve.batching",
    "QueueFullError": "blip2.serve.batching",
    "RequestError": "blip2.serve.limits",
    "decode_image": "blip2.serve.limits",
    "ServerThread": "blip2.serve.server",
    "serve_forever": "blip2.serve.server",
    "ModelService": "blip2.serve.service",
}
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'blip2.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
