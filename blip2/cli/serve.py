"""``blip2 serve``: the model over HTTP with a web page (see ``blip2.serve``).

    blip2 serve --model blip2_stage1_vit_g --index photos_index/ [--caption_model my_stage2/] [--port 8000]
"""

from __future__ import annotations

import argparse
import sys

import torch

from blip2.engine import distributed
from blip2.engine.index import MODES, ImageIndex
from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer
from blip2.serve.settings import ServeSettings

DEFAULTS = ServeSettings()
SERVE_PACKAGES = "fastapi, uvicorn and python-multipart"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="a stage-1 preset name or model folder: /embed, /classify, /search, and /caption "
                             "through its Q-Former LM head unless --caption_model is given (default: the model "
                             "--index was built with)")
    parser.add_argument("--caption_model", default=None,
                        help="a stage-2 model (preset or folder) for /caption, which then takes a prompt field")
    parser.add_argument("--index", default=None, help="an image index folder (blip2 index) for /search and the page")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max_batch_size", type=int, default=DEFAULTS.max_batch_size,
                        help=f"requests per forward (default {DEFAULTS.max_batch_size}); 1 turns batching off")
    parser.add_argument("--batch_window_ms", type=float, default=DEFAULTS.batch_window_ms,
                        help=f"how long a batch waits for more requests (default {DEFAULTS.batch_window_ms} ms)")
    parser.add_argument("--max_queue", type=int, default=DEFAULTS.max_queue,
                        help=f"waiting requests per endpoint before 503 (default {DEFAULTS.max_queue})")
    parser.add_argument("--max_upload_mb", type=float, default=DEFAULTS.max_upload_bytes / 2**20,
                        help=f"request body limit in MiB, 413 above (default {DEFAULTS.max_upload_bytes / 2**20:g})")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULTS.max_image_pixels,
                        help=f"width x height limit, read before decoding; 413 above (default "
                             f"{DEFAULTS.max_image_pixels})")
    parser.add_argument("--search_mode", choices=MODES, default="auto",
                        help="index search: exact, faiss, or auto (faiss for large indexes; default)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the model (default: torch's own choice); on a busy machine fewer "
                             "threads than cores keeps small forwards from waiting on descheduled threads")
    parser.add_argument("--seed", type=int, default=0, help="seeds a model built at random (blip2_tiny)")
    parser.add_argument("--log_level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def settings_from(args: argparse.Namespace) -> ServeSettings:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} must be between 1 and 65535")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max_upload_mb {args.max_upload_mb} must be > 0")
    return ServeSettings(max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms,
                         max_queue=args.max_queue, max_upload_bytes=int(args.max_upload_mb * 2**20),
                         max_image_pixels=args.max_image_pixels)


def server_parts():
    """``(ModelService, create_app, serve_forever)``; the web stack is optional, so it is imported here."""
    try:
        from blip2.serve.app import create_app
        from blip2.serve.server import serve_forever
        from blip2.serve.service import ModelService
    except ImportError as error:
        raise ValueError(f"blip2 serve needs {SERVE_PACKAGES} ({error}): pip install 'blip2[serve]'") from error
    return ModelService, create_app, serve_forever


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # bad numbers are refused before any model is read
    ModelService, create_app, serve_forever = server_parts()
    index = ImageIndex.load(args.index) if args.index is not None else None
    model_name = args.model or (index.model_name if index is not None else None)
    if not model_name:
        raise ValueError("--model is required (a stage-1 preset or folder) unless --index names the model it was "
                         "built with")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    device = distributed.pick_device(args.device)
    torch.manual_seed(args.seed)
    model = Blip2Qformer.from_pretrained(model_name)
    caption_model = (Blip2ImageToTextGeneration.from_pretrained(args.caption_model)
                     if args.caption_model is not None else None)
    service = ModelService(model, device, caption_model=caption_model, index=index, model_name=model_name,
                           search_mode=args.search_mode)  # an index built with other weights is refused here
    print(f"blip2: serving {model_name} on http://{args.host}:{args.port}/"
          + (f" with {len(index)} indexed images" if index is not None else ""), file=sys.stderr)
    serve_forever(create_app(service, settings), host=args.host, port=args.port, log_level=args.log_level)
    return 0
