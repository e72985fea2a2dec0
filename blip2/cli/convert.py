"""``blip2 convert``: turn a LAVIS checkpoint or a Hugging Face BLIP-2 folder into one of our folders.

    blip2 convert --from lavis --input blip2_pretrained.pth --vit eva_vit_g.pth --config blip2_stage1_vit_g --output D
    blip2 convert --from hf --input blip2-itm-vit-g/ --output D
    blip2 convert --from hf --input blip2-opt-2.7b/ --output D          (stage 2: the OPT is written too)

D is refused when it is a file, or a folder holding files blip2 did not write (``--overwrite``: replace only blip2's
own files there, keep the rest).

A config with a ``text_config`` (an LLM) makes a stage-2 model, otherwise stage 1; ``--stage`` overrides.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

from blip2.config import Blip2Config
from blip2.files import check_output_folder
from blip2.models import Blip2ImageToTextGeneration, Blip2Qformer
from blip2.weights import hf, lavis
from blip2.weights.load import load_with_adapter

USAGE_ERROR = 2  # the exit status of a problem with the user's input (as every blip2 command)
FORMATS = {"lavis": lavis, "hf": hf}
DESCRIPTIONS = {"lavis": "a LAVIS checkpoint (.pth)", "hf": "a Hugging Face BLIP-2 folder (config.json)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_format", required=True, choices=sorted(FORMATS),
                        help="the checkpoint format of --input")
    parser.add_argument("--input", required=True, type=Path, help="LAVIS .pth file or Hugging Face folder")
    parser.add_argument("--output", required=True, type=Path, help="folder to write config.yaml + model.safetensors")
    parser.add_argument("--config", help="Blip2Config YAML file or preset name (required for LAVIS)")
    parser.add_argument("--vit", type=Path, help="eva_vit_g.pth, for LAVIS checkpoints saved without the ViT")
    parser.add_argument("--stage", type=int, choices=(1, 2),
                        help="the model to write (default: 2 when the config has a text_config, else 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an --output folder that holds other files too (only blip2's own files "
                        "there are replaced; nothing is deleted)")


def _config(spec: str) -> Blip2Config:
    if Path(spec).is_file():
        return Blip2Config.from_yaml(spec)
    return Blip2Config.from_pretrained(spec)


def run(args: argparse.Namespace) -> int:
    """Convert as ``args`` say; a problem is one line on stderr and exit status 2."""
    try:
        if not args.input.exists():
            raise FileNotFoundError(f"--input {args.input} does not exist")
        adapter = FORMATS[args.source_format]
        if not adapter.detect(args.input):
            raise ValueError(f"--input {args.input} is not {DESCRIPTIONS[args.source_format]}")
        if args.source_format == "lavis" and args.config is None:
            raise ValueError(
                "--from lavis needs --config (a YAML file or a preset name): LAVIS checkpoints carry no config"
            )
        if args.vit is not None and args.source_format != "lavis":
            raise ValueError("--vit is for --from lavis only")
        check_output_folder(args.output, args.overwrite)  # before the slow part: refuse a folder of other files
        config = _config(args.config) if args.config else adapter.read_config(args.input)
        stage = args.stage or (1 if config.text_config is None else 2)
        kwargs = {"vit_checkpoint": args.vit} if args.source_format == "lavis" else {}
        model_class = Blip2Qformer if stage == 1 else Blip2ImageToTextGeneration
        model = load_with_adapter(model_class, adapter, args.input, config=config, **kwargs)
        model.save_pretrained(args.output, overwrite=args.overwrite)
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"blip2 convert: error: {' '.join(str(message).split())}", file=sys.stderr)
        return USAGE_ERROR
    print(f"{model.load_report.summary()}; wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="blip2 convert", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
