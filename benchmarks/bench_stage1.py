"""Stage-1 inference speed: blip2's Blip2Qformer against transformers' Blip2ForImageTextRetrieval (SDPA), same
config, same weights, same batch.

Paths timed (both sides run ViT + ln_vision/post_layernorm first):
  features  ours ``get_image_features``  vs HF vision_model + qformer query pass + vision_projection (as its forward)
  itm       ours ``itm_logits``          vs HF ``forward(use_image_text_matching_head=True)``
  itc       ours ``itc_similarity``      vs HF ``forward(use_image_text_matching_head=False)``

The transformers model is built from a transformers ``Blip2Config`` with its own random initialisation, saved with
``save_pretrained`` and loaded into ours with ``Blip2Qformer.from_pretrained``; outputs are compared before timing.

    python benchmarks/bench_stage1.py                                  # CPU, fp32: tiny and vit-b, batch 1 and 8
    python benchmarks/bench_stage1.py --device cuda                    # ViT-g, bf16 autocast, batch 64 and 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable

import torch
import torch.nn.functional as F

import common
from blip2 import Blip2Qformer
from blip2.config import Blip2Config

PATHS = ("features", "itm", "itc")


def hf_config(config: Blip2Config):
    """The transformers ``Blip2Config`` with our config's shapes, SDPA attention."""
    from transformers import Blip2Config as HFBlip2Config

    vision_kwargs, qformer_kwargs = common.hf_vision_qformer_kwargs(config, text_input=True)
    qformer = config.qformer_config
    return HFBlip2Config(vision_config=vision_kwargs, qformer_config=qformer_kwargs,
                         num_query_tokens=qformer.query_length, image_text_hidden_size=config.embed_dim,
                         image_token_index=None)


def build_pair(config: Blip2Config, device: torch.device):
    """(ours, transformers') in eval mode on ``device``, fp32 weights, identical values through a saved folder."""
    from transformers import Blip2ForImageTextRetrieval

    with torch.device(device):  # random init where the model runs: fast for ViT-g on a GPU
        hf = Blip2ForImageTextRetrieval._from_config(hf_config(config), attn_implementation="sdpa")
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as folder:
        hf.save_pretrained(folder)
        ours = Blip2Qformer.from_pretrained(folder)
    return ours.to(device).eval(), hf.eval()


def hf_image_features(hf, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image half of transformers' ITC forward: ViT, query pass, vision_projection, normalize -> (B, Q, E)."""
    image_embeds = hf.vision_model(pixel_values=pixel_values).last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    queries = hf.query_tokens.expand(image_embeds.shape[0], -1, -1)
    query_out = hf.qformer(query_embeds=queries, encoder_hidden_states=image_embeds,
                           encoder_attention_mask=image_mask).last_hidden_state
    return F.normalize(hf.vision_projection(query_out.to(hf.vision_projection.weight.dtype)), dim=-1)


def path_fns(path: str, ours, hf, pixel_values, input_ids, attention_mask) -> tuple[Callable, Callable]:
    """(ours, transformers') zero-argument callables for one path."""
    if path == "features":
        return lambda: ours.get_image_features(pixel_values), lambda: hf_image_features(hf, pixel_values)
    use_itm = path == "itm"
    ours_fn = ours.itm_logits if use_itm else ours.itc_similarity

    def hf_fn():
        return hf(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                  use_image_text_matching_head=use_itm).logits_per_image

    return lambda: ours_fn(pixel_values, input_ids, attention_mask), hf_fn


def inference_call(fn: Callable, device: torch.device, dtype: str) -> Callable:
    """``fn`` under inference_mode and its own autocast region, entered per call as an evaluation loop does: one
    region around every timed run would let autocast cache the weight casts of parameters that require grad
    (all of HF's, none of our frozen ViT's) across runs."""
    def call():
        with torch.inference_mode(), common.autocast(device, dtype):
            return fn()

    return call


def path_flops(path: str, config: Blip2Config, batch: int) -> float:
    if path == "features":
        return common.image_features_flops(config)
    if path == "itm":
        return common.itm_flops(config)
    return common.itc_flops(config, batch)


def bench_config(name: str, args, device: torch.device) -> list[list[str]]:
    """Table rows for one config: every path at every batch size."""
    config = common.CONFIGS[name]()
    start = time.perf_counter()
    ours, hf = build_pair(config, device)
    print(f"  {name}: both models built, saved and loaded in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for batch in args.batch_sizes:
        inputs = common.synthetic_batch(config, batch, device)
        for path in args.paths:
            ours_fn, hf_fn = (inference_call(fn, device, args.dtype) for fn in path_fns(path, ours, hf, *inputs))
            diff = (ours_fn().float() - hf_fn().float()).abs().max().item()
            ms = common.time_interleaved({"ours": ours_fn, "hf": hf_fn}, args.iters, args.warmup, device,
                                         args.min_seconds)
            rows.append(format_row(name, path, batch, ms, diff, path_flops(path, config, batch), args.peak_tflops))
            print(f"  {name} {path} batch {batch}: ours {ms['ours']:.1f} ms, HF {ms['hf']:.1f} ms", flush=True)
    del ours, hf
    return rows


def format_row(name, path, batch, ms, diff, flops, peak_tflops) -> list[str]:
    ours_ips, hf_ips = batch * 1000 / ms["ours"], batch * 1000 / ms["hf"]
    row = [name, path, str(batch), f"{ms['ours']:.2f}", f"{ms['hf']:.2f}", f"{ms['hf'] / ms['ours']:.2f}x",
           f"{ours_ips:.1f}", f"{hf_ips:.1f}", f"{diff:.1e}", f"{flops / 1e9:.3g}"]
    if peak_tflops:
        limit = peak_tflops * 1e12 / flops
        row += [f"{limit:.0f}", f"{100 * ours_ips / limit:.1f}%"]
    return row


def headers(peak_tflops: float | None) -> list[str]:
    names = ["config", "path", "batch", "ours ms", "HF ms", "speed-up", "ours img/s", "HF img/s", "max abs diff",
             "GFLOP/img"]
    return names + (["limit img/s", "ours % of limit"] if peak_tflops else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="comma-separated, from: " + ", ".join(common.CONFIGS)
                        + " (default: tiny,vit-b on CPU, vit-g on CUDA)")
    parser.add_argument("--batch-sizes", help="comma-separated (default: 1,8 on CPU, 64,128 on CUDA)")
    parser.add_argument("--paths", default="features,itm", help=f"comma-separated, from: {', '.join(PATHS)}")
    common.add_timing_arguments(parser, unit="runs", peak_use="the limit columns")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.configs = common.parse_list(args.configs or ("vit-g" if cuda else "tiny,vit-b"))
    args.batch_sizes = common.parse_list(args.batch_sizes or ("64,128" if cuda else "1,8"), int)
    args.paths = common.parse_list(args.paths)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.peak_tflops = args.peak_tflops or (989.0 if cuda else None)
    common.check_config_names(args.configs)
    if any(path not in PATHS for path in args.paths):
        parser.error(f"--paths {args.paths}: choose from {', '.join(PATHS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = common.start(args.device, args.threads, quiet_transformers=True)
    rows = []
    for name in args.configs:
        rows += bench_config(name, args, device)
    print(f"\ndtype {args.dtype}, median of >= {args.iters} runs (>= {args.min_seconds:g} s) after the output check "
          f"and {args.warmup} more warm-up, torch.inference_mode, transformers with attn_implementation='sdpa'; "
          "speed-up = HF ms / ours ms")
    print(common.markdown_table(headers(args.peak_tflops), rows))
    if args.peak_tflops:
        print(f"limit img/s = peak {args.peak_tflops:g} TFLOP/s / model FLOPs per image (from the shapes)")


if __name__ == "__main__":
    main()
