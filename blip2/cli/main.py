"""``blip2`` command line: run | convert | shard | demo | extract | index | search | serve. Thin: parse, build the config, call the
library; a problem with the user's input is one line on stderr and exit status 2.

    blip2 run --config configs/blip2/run_blip2_quickstart.yaml --run_mode train
    torchrun --nproc_per_node 2 -m blip2 run --config ... --run_mode train
"""

from __future__ import annotations

import argparse
import os
import sys

from blip2.cli import convert, demo, extract, index, run, search, serve, shard
from blip2.config import ConfigError
from blip2.engine.trainer import NonFiniteLossError
from blip2.files import OutputWriteError
from blip2.weights import WeightLoadError

USAGE_ERROR = convert.USAGE_ERROR  # the exit status of a problem with the user's input
# problems with the user's input or the user's folders: one line and exit status 2 (BLIP2_DEBUG=1 shows the
# traceback); other OSErrors (a disk that fails mid-run) are reported by the code that can name the file
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, KeyError, WeightLoadError, NonFiniteLossError,
               PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError, OutputWriteError)


COMMANDS = {"run": run.cmd_run, "extract": extract.cmd_extract, "shard": shard.cmd_shard, "index": index.cmd_index,
            "search": search.cmd_search, "serve": serve.cmd_serve}  # convert reports its own errors; demo below


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2", description="BLIP-2: train, evaluate and run the model")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_arguments(sub.add_parser("run", help="train, evaluate or predict from a run YAML"))
    convert.add_arguments(sub.add_parser("convert", help="turn LAVIS / Hugging Face weights into our folder"))
    shard.add_arguments(sub.add_parser("shard", help="write webdataset tar shards (image + captions) for streaming "
                                                     "training"))
    demo.add_arguments(sub.add_parser("demo", help="generate data, train the quickstart model, evaluate, show "
                                                   "predictions"))
    extract.add_arguments(sub.add_parser("extract", help="embed an image folder into safetensors feature shards"))
    index.add_arguments(sub.add_parser("index", help="build or update a searchable image index (incremental, "
                                                     "resumable)"))
    search.add_arguments(sub.add_parser("search", help="search an image index by text (ITC, optional ITM re-rank)"))
    serve.add_arguments(sub.add_parser("serve", help="serve caption / classify / search / embed over HTTP, with a "
                                                     "web page"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        return convert.run(args)
    try:
        if args.command in COMMANDS:
            return COMMANDS[args.command](args)
        demo.run_demo(args.output_dir, steps=args.steps, device=args.device, stage2_steps=args.stage2_steps)
        return 0
    except USER_ERRORS as error:
        if os.environ.get("BLIP2_DEBUG"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"blip2: error: {message}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
