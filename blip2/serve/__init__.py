"""``blip2 serve``: a stage-1 model (and optionally a stage-2 caption model and an image index) over HTTP.

``create_app(ModelService(model, index=...), ServeSettings(...))`` builds the FastAPI app (``app``); requests are
batched dynamically (``batching``), uploads checked before decoding (``limits``), and the model work lives in
``service``. ``server.ServerThread`` runs an app on a free loopback port for tests and benchmarks.
"""

from blip2.serve.app import ServeSettings, create_app
from blip2.serve.batching import DynamicBatcher, QueueFullError
from blip2.serve.limits import RequestError, decode_image
from blip2.serve.server import ServerThread, serve_forever
from blip2.serve.service import ModelService

__all__ = ["ServeSettings", "create_app", "DynamicBatcher", "QueueFullError", "RequestError", "decode_image",
           "ServerThread", "serve_forever", "ModelService"]
