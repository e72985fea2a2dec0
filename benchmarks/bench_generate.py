"""Stage-2 generation speed: blip2's ``Blip2ImageToTextGeneration.generate`` against transformers'
``Blip2ForConditionalGeneration.generate``, same config, same weights, same generation settings.

Both decode greedily exactly ``--new-tokens`` tokens per image (``max_new_tokens`` = ``min_new_tokens``, so neither
stops early at an EOS) from the BOS alone, after the ViT, the Q-Former and the projection. Reported: milliseconds per
batch (median), milliseconds per caption (batch time / batch size), captions per second, and whether both produced the
same tokens (checked on each side's first run, before timing).

Weights: the transformers model is built with random weights on the device, in the weight dtype. ``tiny`` is saved
with ``save_pretrained`` and read back with ``Blip2ImageToTextGeneration.from_pretrained``, the loader users run; the
3.8B-parameter ``opt-2.7b`` is copied in memory through the same key map (``blip2.weights.hf.to_native``) into our
model built on the device, so nothing is ever materialised in fp32 on the CPU.

Precision on CUDA: transformers' model in bf16 with its Q-Former in fp32 (its ``_keep_in_fp32_modules``), run as
transformers runs it; ours with the ViT and the LLM in bf16 and the Q-Former in fp32 under bf16 autocast, as our
pipeline runs it. CPU: both fp32.

    python benchmarks/bench_generate.py                                   # CPU fp32: tiny, batch 1 and 16
    python benchmarks/bench_generate.py --device cuda                     # opt-2.7b in bf16, batch 1 and 16
    python benchmarks/bench_generate.py --device cuda --compile           # + static KV cache, compiled decode step
    python benchmarks/bench_generate.py --shape opt-2.7b --num-llm-layers 1 --num-vit-layers 1 --dtype bfloat16 \\
        --batch-sizes 1 --new-tokens 4 --iters 1                          # the opt-2.7b code path, shrunk, on CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

import common
from blip2 import Blip2ImageToTextGeneration, registry
from blip2.config import Blip2Config, QformerConfig, ViTConfig

OPT_VOCAB = 50272
OPT_IMAGE_TOKEN = 50265  # the <image> id transformers' blip2-opt-2.7b adds (inside the padded vocabulary)
# text_config keys of ours that are not the LLM's transformers config
OURS_ONLY = ("checkpoint_name_or_path", "seq_length", "dtype")


def tiny_config() -> Blip2Config:
    """The blip2_tiny ViT and Q-Former (image 32, width 64, 2 layers, 8 queries) feeding a 2-layer OPT of width 64
    with OPT's own vocabulary (so the LM head costs what it costs in OPT-2.7b, relative to the width)."""
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)
    qformer = QformerConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            query_length=8, max_position_embeddings=64)
    opt = {"model_type": "opt", "hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 256, "num_attention_heads": 4,
           "vocab_size": OPT_VOCAB, "max_position_embeddings": 128, "word_embed_proj_dim": 64, "bos_token_id": 2,
           "eos_token_id": 50118, "pad_token_id": 1}
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt, embed_dim=32, max_txt_len=32)


@dataclass(frozen=True)
class Shape:
    build_config: Callable[[], Blip2Config]
    via_folder: bool  # ours read from a saved transformers folder (small) or copied in memory (large)
    cpu_batch_sizes: str
    cuda_batch_sizes: str


SHAPES = {
    "tiny": Shape(tiny_config, via_folder=True, cpu_batch_sizes="1,16", cuda_batch_sizes="1,16"),
    # Salesforce/blip2-opt-2.7b: EVA ViT-g/14 (39 blocks, width 1408), Q-Former bert-base (32 queries), OPT-2.7b
    # (width 2560, 32 layers, 32 heads, FFN 10240, vocabulary 50272)
    "opt-2.7b": Shape(lambda: Blip2Config.from_dict(registry.get_preset("blip2_opt_2.7b").build_config()), via_folder=False,
                      cpu_batch_sizes="1", cuda_batch_sizes="1,16"),
}


def shaped_config(name: str, args) -> Blip2Config:
    """The shape's config, with ``--num-vit-layers`` / ``--num-llm-layers`` applied (to try the path on a CPU)."""
    config = SHAPES[name].build_config()
    if args.num_vit_layers:
        config = config.replace(vision_config=config.vision_config.replace(num_hidden_layers=args.num_vit_layers))
    if args.num_llm_layers:
        config = config.replace(text_config={**config.text_config, "num_hidden_layers": args.num_llm_layers})
    return config


def hf_config(config: Blip2Config):
    """transformers' ``Blip2Config`` for ``Blip2ForConditionalGeneration`` with our config's shapes, SDPA."""
    from transformers import Blip2Config as HFBlip2Config

    vision_kwargs, qformer_kwargs = common.hf_vision_qformer_kwargs(config, text_input=False)
    qformer = config.qformer_config
    text = {key: value for key, value in config.text_config.items() if key not in OURS_ONLY}
    return HFBlip2Config(vision_config=vision_kwargs, qformer_config=qformer_kwargs, text_config=text,
                         num_query_tokens=qformer.query_length, image_token_index=OPT_IMAGE_TOKEN)


def build_pair(config: Blip2Config, shape: Shape, device: torch.device, dtype: torch.dtype):
    """(ours, transformers') in eval mode on ``device`` with the same weights; transformers' in ``dtype``."""
    from transformers import Blip2ForConditionalGeneration

    from blip2.weights import hf as hf_format
    from blip2.config import config_from_hf_folder
    from blip2.weights.loader import load_into

    with torch.device(device):  # random init where the model runs, in its weight dtype
        hf = Blip2ForConditionalGeneration._from_config(hf_config(config), attn_implementation="sdpa", dtype=dtype)
    # from_pretrained(dtype=...) keeps these in fp32 (_keep_in_fp32_modules); _from_config does not
    hf.qformer.float()
    hf.query_tokens.data = hf.query_tokens.data.float()
    hf.eval()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as folder:
        if shape.via_folder:
            hf.save_pretrained(folder)
            ours = Blip2ImageToTextGeneration.from_pretrained(folder)
        else:
            hf.config.save_pretrained(folder)  # config.json alone: our config read as from_pretrained reads it
            ours_config = config_from_hf_folder(folder)
            ours_config.text_config["dtype"] = str(dtype).removeprefix("torch.")  # the LLM built in bf16
            with torch.device(device):
                ours = Blip2ImageToTextGeneration(ours_config)
            state, dropped = hf_format.to_native(hf.state_dict(), ours_config)
            load_into(ours, state, source="transformers model (in memory)",
                      allowed_missing=hf_format.allowed_missing(ours), dropped=dropped)
            del state
    ours = ours.to(device).eval()
    if dtype != torch.float32:
        ours.vision_model.to(dtype)  # the frozen ViT runs in bf16 (DESIGN); the Q-Former keeps fp32 weights
    return ours, hf


def generate_fns(ours, hf, pixel_values: torch.Tensor, settings: dict, device: torch.device, dtype: str):
    """(ours, transformers') zero-argument callables returning the new tokens (B, T)."""
    prefix = ours.config.qformer_config.query_length + 1  # transformers returns the <image> ids and the BOS too

    def ours_fn():
        with torch.inference_mode(), common.autocast(device, dtype):
            return ours.generate(pixel_values, **settings)

    def hf_fn():
        with torch.inference_mode():
            return hf.generate(pixel_values, **settings)[:, prefix:]

    return ours_fn, hf_fn


def bench_shape(name: str, args, device: torch.device) -> list[list[str]]:
    config = shaped_config(name, args)
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    ours, hf = build_pair(config, SHAPES[name], device, dtype)
    params = sum(p.numel() for p in hf.parameters()) / 1e9
    how = "saved and loaded" if SHAPES[name].via_folder else "copied in memory"
    print(f"  {name}: {params:.3g}B parameters, both models built and {how} in {time.perf_counter() - start:.1f} s",
          flush=True)
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, num_beams=1)
    if args.compile:
        settings["cache_implementation"] = "static"  # on CUDA transformers then compiles the decoding step
    size = config.vision_config.image_size
    rows = []
    for batch in args.batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        pixel_values = torch.randn(batch, 3, size, size, generator=generator).to(device)
        ours_fn, hf_fn = generate_fns(ours, hf, pixel_values, settings, device, args.dtype)
        start = time.perf_counter()
        ours_ids, hf_ids = ours_fn(), hf_fn()  # the output check, and the first warm-up (compiles with --compile)
        first_s = time.perf_counter() - start
        same = same_tokens(ours_ids, hf_ids)
        print(f"  {name} batch {batch}: first calls {first_s:.1f} s; tokens: {same}", flush=True)
        ms = common.time_interleaved({"ours": ours_fn, "hf": hf_fn}, args.iters, args.warmup, device,
                                     args.min_seconds)
        rows.append(format_row(name, batch, args.new_tokens, ms, same))
        print(f"  {name} batch {batch}: ours {ms['ours']:.1f} ms, HF {ms['hf']:.1f} ms", flush=True)
    del ours, hf
    return rows


def same_tokens(ours_ids: torch.Tensor, hf_ids: torch.Tensor) -> str:
    """"identical", or the share of equal tokens and the first step where a row differs."""
    if ours_ids.shape != hf_ids.shape:
        return f"shapes differ: ours {tuple(ours_ids.shape)}, HF {tuple(hf_ids.shape)}"
    equal = ours_ids == hf_ids
    if bool(equal.all()):
        return "identical"
    first = int((~equal).any(0).nonzero()[0])
    return f"{100 * equal.float().mean().item():.0f}% equal, first difference at step {first}"


def format_row(name: str, batch: int, new_tokens: int, ms: dict[str, float], same: str) -> list[str]:
    return [name, str(batch), str(new_tokens), f"{ms['ours']:.1f}", f"{ms['hf']:.1f}", f"{ms['hf'] / ms['ours']:.2f}x",
            f"{ms['ours'] / batch:.2f}", f"{ms['hf'] / batch:.2f}", f"{batch * 1000 / ms['ours']:.1f}",
            f"{batch * 1000 / ms['hf']:.1f}", same]


HEADERS = ["shape", "batch", "new tokens", "ours ms/batch", "HF ms/batch", "speed-up", "ours ms/caption",
           "HF ms/caption", "ours captions/s", "HF captions/s", "tokens ours vs HF"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="comma-separated, from: " + ", ".join(SHAPES)
                        + " (default: tiny on CPU, opt-2.7b on CUDA)")
    parser.add_argument("--batch-sizes", "--batch_sizes", help="comma-separated (default: 1,16; opt-2.7b on CPU: 1)")
    parser.add_argument("--new-tokens", "--new_tokens", type=int, default=30,
                        help="tokens decoded per caption: max_new_tokens = min_new_tokens")
    parser.add_argument("--num-vit-layers", "--num_vit_layers", type=int,
                        help="override the ViT depth (to try a large shape's code path on a CPU)")
    parser.add_argument("--num-llm-layers", "--num_llm_layers", type=int, help="override the LLM depth")
    parser.add_argument("--compile", action="store_true",
                        help="static KV cache (cache_implementation='static') for both models; on CUDA transformers "
                             "then compiles the decoding step with torch.compile (mode reduce-overhead, CUDA graphs)")
    common.add_timing_arguments(
        parser, unit="runs", peak_use=None,
        warmup=(None, "after the output check (default: 0 on CPU, 1 on CUDA, 2 with --compile)"),
        dtype_help="weight dtype of transformers' model, of our ViT and LLM, and our autocast dtype")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = common.parse_list(args.shape or ("opt-2.7b" if cuda else "tiny"))
    unknown = [name for name in args.shape if name not in SHAPES]
    if unknown:
        parser.error(f"unknown shape {unknown[0]!r}; available: {', '.join(SHAPES)}")
    if args.batch_sizes is None:
        sizes = {SHAPES[name].cuda_batch_sizes if cuda else SHAPES[name].cpu_batch_sizes for name in args.shape}
        args.batch_sizes = max(sizes, key=len)
    args.batch_sizes = common.parse_list(args.batch_sizes, int)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.warmup is None:
        args.warmup = (2 if args.compile else 1) if cuda else 0
    if args.new_tokens < 1:
        parser.error(f"--new-tokens {args.new_tokens} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = common.start(args.device, args.threads, quiet_transformers=True)
    rows = []
    for name in args.shape:
        rows += bench_shape(name, args, device)
    layers = "".join(f", {flag} {value}" for flag, value in (("ViT layers", args.num_vit_layers),
                                                             ("LLM layers", args.num_llm_layers)) if value)
    cache = "dynamic KV cache"
    if args.compile:
        cache = "static KV cache" + (" + torch.compile of the decoding step" if device.type == "cuda" else "")
    print(f"\ndtype {args.dtype}{layers}; greedy, {args.new_tokens} new tokens per caption (max_new_tokens = "
          f"min_new_tokens), no prompt; {cache}; median of >= {args.iters} runs (>= {args.min_seconds:g} s) after the "
          f"output check and {args.warmup} more warm-up, torch.inference_mode, transformers with "
          "attn_implementation='sdpa'; ms/caption = ms/batch / batch; speed-up = HF ms / ours ms")
    print(common.markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
