"""Stage-1 training throughput: the full step (forward with the ITC, ITM and LM losses, backward, AdamW step) on
synthetic tensors, with images/s, peak memory, model FLOPs and the share of the step spent in the ViT forward.

The model has random weights and is built from a config as the presets build it (vit-b and vit-g freeze the ViT;
tiny trains it). The optimizer is ``blip2.engine.optim.build_optimizer`` (AdamW, fused on CUDA); on CUDA the step
runs under bf16 autocast over fp32 weights, as ``Trainer.autocast`` does.

    python benchmarks/bench_train.py                      # CPU, fp32: tiny (batch 32) and vit-b (batch 2)
    python benchmarks/bench_train.py --device cuda        # ViT-g + Q-Former, bf16 autocast, batch 64 and 128
"""

from __future__ import annotations

import argparse

import torch

import common
from blip2 import Blip2Qformer
from blip2.engine.optim import build_optimizer

CPU_BATCH_SIZES = {"tiny": [32], "vit-b": [2], "vit-g": [2]}
CUDA_BATCH_SIZES = {"tiny": [256], "vit-b": [64, 128], "vit-g": [64, 128]}


def build_model(name: str, device: torch.device) -> Blip2Qformer:
    """Random weights, built on ``device`` (fast initialisation of ViT-g on a GPU), in training mode."""
    with torch.device(device):
        model = Blip2Qformer(common.CONFIGS[name]())
    return model.train()


def make_step(model, optimizer, inputs, device: torch.device, dtype: str):
    """One training step as the Trainer runs it (no gradient clipping: max_grad_norm defaults to None)."""
    def step():
        with common.autocast(device, dtype):
            loss = model(*inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_vit_forward(model, pixel_values, device: torch.device, dtype: str):
    """The ViT (+ ln_vision) forward alone, in the step's grad mode: no graph for a frozen ViT."""
    def vit_forward():
        with common.autocast(device, dtype):
            model.encode_image(pixel_values)

    return vit_forward


def bench_one(model, name: str, batch: int, args, device: torch.device) -> tuple[list[str], str]:
    """Measure one (config, batch); returns the table row and the FLOP formula used."""
    inputs = common.synthetic_batch(model.config, batch, device)
    optimizer = build_optimizer(model, learning_rate=1e-5, weight_decay=0.05)
    step = make_step(model, optimizer, inputs, device, args.dtype)
    first_loss = step()  # creates the AdamW state; it stays resident, so the peak measured below includes it
    if not torch.isfinite(first_loss):
        print(f"  warning: {name} batch {batch}: non-finite loss {first_loss.item()} (timings still stand)")
    memory = common.PeakMemory(device)
    memory.reset()
    times = common.time_interleaved({"step": step}, args.iters, args.warmup, device, args.min_seconds)
    peak = memory.peak_mib()
    vit = common.time_interleaved({"vit": make_vit_forward(model, inputs[0], device, args.dtype)}, args.iters,
                                  args.warmup, device, args.min_seconds)
    flops, formula = common.train_flops(model.config, batch)
    step_ms, vit_ms = times["step"], vit["vit"]
    images_per_s = batch * 1000 / step_ms
    achieved = images_per_s * flops / 1e12
    row = [name, str(batch), f"{step_ms:.1f}", f"{vit_ms:.1f}", f"{100 * vit_ms / step_ms:.0f}%",
           f"{step_ms - vit_ms:.1f}", f"{images_per_s:.1f}", f"{peak:.0f}" + ("" if memory.exact else "*"),
           f"{flops / 1e9:.3g}", f"{achieved:.3g}"]
    if args.peak_tflops:
        row.append(f"{100 * achieved / args.peak_tflops:.1f}%")
    del optimizer
    return row, formula


def headers(device: torch.device, peak_tflops: float | None) -> list[str]:
    memory = "peak alloc MiB" if device.type == "cuda" else "peak RSS MiB"
    names = ["config", "batch", "step ms", "ViT fwd ms", "ViT share", "rest ms", "img/s", memory, "GFLOP/img",
             "TFLOP/s"]
    return names + (["MFU"] if peak_tflops else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help="comma-separated, from: " + ", ".join(common.CONFIGS)
                        + " (default: tiny,vit-b on CPU, vit-g on CUDA)")
    parser.add_argument("--batch-sizes", help="comma-separated, for every config (default per config: "
                        f"CPU {CPU_BATCH_SIZES}, CUDA {CUDA_BATCH_SIZES})")
    common.add_timing_arguments(parser, unit="steps", peak_use="MFU")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.configs = common.parse_list(args.configs or ("vit-g" if cuda else "tiny,vit-b"))
    common.check_config_names(args.configs)
    args.batch_sizes = common.parse_list(args.batch_sizes, int) if args.batch_sizes else None
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.peak_tflops = args.peak_tflops or (989.0 if cuda else None)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = common.start(args.device, args.threads)
    defaults = CUDA_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES
    rows, formulas = [], {}
    for name in args.configs:
        model = build_model(name, device)
        for batch in args.batch_sizes or defaults[name]:
            row, formulas[name] = bench_one(model, name, batch, args, device)
            rows.append(row)
            print(f"  {name} batch {batch}: {row[2]} ms/step, {row[6]} img/s", flush=True)
        del model
    print(f"\ndtype {args.dtype}, median of >= {args.iters} steps (>= {args.min_seconds:g} s) after "
          f"{args.warmup} warm-up; step = forward (ITC + ITM + LM) + backward + AdamW step")
    print(common.markdown_table(headers(device, args.peak_tflops), rows))
    for name, formula in formulas.items():
        print(f"{name}: FLOPs/img = {formula}")
    print("QFormer_fwd = query pass + text pass + ITC + 3 x joint ITM pass + LM pass over the cached queries + LM head "
          "on the real tokens; text padded to 32, FLOPs = 2 x multiply-adds of matmuls; TFLOP/s = img/s x FLOPs/img"
          + ("; MFU = TFLOP/s / peak" if args.peak_tflops else ""))
    if device.type == "cpu":
        print("peak RSS: the process's resident set over the timed steps (weights, gradients, AdamW state and "
              "activations)" + ("" if all(not row[7].endswith("*") for row in rows) else "; * = whole-process peak"))


if __name__ == "__main__":
    main()
