"""Memory of reading a stage-2 LLM folder: peak RSS against the checkpoint's size.

Writes a random LLaMA-shaped checkpoint as transformers ships one (config.json, bf16 safetensors shards of at most
``--shard-gb`` with ``model.safetensors.index.json``), then loads it in a fresh Python process per row and reports
that process's peak resident memory (``resource.getrusage(...).ru_maxrss``, file-backed pages included) after every
weight has been read once (a checksum over all parameters, so pages that a lazy load maps but never touches count
too). Rows:

- ``load_causal_lm``: ``blip2.weights.llm.load_causal_lm({"checkpoint_name_or_path": folder}, dtype=bfloat16)``;
- ``stage-2 model``: ``Blip2ImageToTextGeneration(config)`` with a tiny ViT and Q-Former and the folder as its
  ``text_config.checkpoint_name_or_path`` (dtype bfloat16), the way users build it;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(folder, dtype=bfloat16)``, for reference.

A load that initialised the model randomly before reading, or held a second copy, would show as peak minus baseline
near twice the checkpoint. The files written are deleted at the end (``--keep`` keeps them).

    python benchmarks/bench_llm_load.py --size 1b          # 1.1B (TinyLlama shape), 2.2 GB
    python benchmarks/bench_llm_load.py --size 7b          # LLaMA-7B shape, 13.5 GB on disk; needs ~15 GB RAM
    python benchmarks/bench_llm_load.py --size 3b --rows load_causal_lm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024**3
SHAPES = {  # LLaMA-style decoder shapes (name: hidden, layers, heads, kv heads, ffn, vocab)
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=688, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, vocab_size=32000),  # TinyLlama-1.1B
    "3b": dict(hidden_size=3200, num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=8640, vocab_size=32000),  # OpenLLaMA-3B
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),  # LLaMA-7B
}
ROWS = ("load_causal_lm", "stage-2 model", "transformers")

CHILD = r"""
import json, resource, sys, time, torch
folder, row = sys.argv[1], sys.argv[2]
def rss(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))
if row == "transformers":
    from transformers import AutoModelForCausalLM
else:
    from blip2 import Blip2ImageToTextGeneration
    from blip2.config import Blip2Config, QformerConfig, ViTConfig
    from blip2.weights.llm import load_causal_lm
baseline = rss("VmRSS")
start = time.perf_counter()
if row == "transformers":
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
elif row == "load_causal_lm":
    llm = load_causal_lm({"checkpoint_name_or_path": folder}, dtype=torch.bfloat16)
else:
    vision = ViTConfig(image_size=30, patch_size=6, hidden_size=36, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37)
    qformer = QformerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                            query_length=4)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, embed_dim=24,
                         text_config={"checkpoint_name_or_path": folder, "dtype": "bfloat16"})
    llm = Blip2ImageToTextGeneration(config).language_model
seconds = time.perf_counter() - start
with torch.no_grad():  # read every weight once: a lazily mapped file counts only once touched
    checksum = sum(float(param.sum(dtype=torch.float32)) for param in llm.parameters())  # no fp32 copy
print(json.dumps({"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "anon": rss("RssAnon"), "file": rss("RssFile"), "seconds": seconds,
                  "dtypes": sorted({str(p.dtype) for p in llm.parameters()}), "checksum": checksum}))
"""


def llama_tensors(shape: dict):
    """(name, shape) of every LLaMA tensor, in the order transformers saves them (lm_head untied)."""
    hidden, ffn, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    yield "model.embed_tokens.weight", (vocab, hidden)
    for layer in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attn.q_proj.weight", (hidden, hidden)
        yield prefix + "self_attn.k_proj.weight", (kv, hidden)
        yield prefix + "self_attn.v_proj.weight", (kv, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, hidden)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        yield prefix + "mlp.gate_proj.weight", (ffn, hidden)
        yield prefix + "mlp.up_proj.weight", (ffn, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, ffn)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_checkpoint(folder: Path, size: str, shard_bytes: int) -> int:
    """A random bf16 LLaMA folder of shape ``size``, sharded as transformers shards; returns its weight bytes."""
    from transformers import LlamaConfig

    shape = SHAPES[size]
    LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    shard_key_lists: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    total = 0
    for name, tensor_shape in llama_tensors(shape):
        tensor = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard and sum(value.nbytes for value in shard.values()) + tensor.nbytes > shard_bytes:
            shard_key_lists.append(save_shard(folder, shard, len(shard_key_lists) + 1))
            shard = {}
        shard[name] = tensor
        total += tensor.nbytes
    shard_key_lists.append(save_shard(folder, shard, len(shard_key_lists) + 1))
    count, weight_map = len(shard_key_lists), {}
    for number, keys in enumerate(shard_key_lists, start=1):  # named once the count is known, as transformers names
        name = f"model-{number:05d}-of-{count:05d}.safetensors"
        (folder / f"shard-{number}.safetensors").rename(folder / name)
        weight_map |= dict.fromkeys(keys, name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def save_shard(folder: Path, shard: dict[str, torch.Tensor], number: int) -> list[str]:
    from safetensors.torch import save_file

    save_file(shard, str(folder / f"shard-{number}.safetensors"), metadata={"format": "pt"})
    return list(shard)


def measure(folder: Path, row: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), row], capture_output=True, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if result.returncode != 0:
        raise SystemExit(f"{row} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SHAPES, default="1b")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--shard-gb", type=float, default=5.0, help="largest shard, GB (transformers' default: 5)")
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    args = parser.parse_args()
    rows = [row for row in args.rows.split(",") if row]
    unknown = [row for row in rows if row not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {unknown[0]!r}; available: {', '.join(ROWS)}")
    folder = Path(tempfile.mkdtemp(prefix=f"bench_llm_{args.size}_", dir=args.dir))
    try:
        start = time.perf_counter()
        total = write_checkpoint(folder, args.size, int(args.shard_gb * 1e9))
        shards = len(list(folder.glob("model-*.safetensors")))
        print(f"wrote {total / GIB:.2f} GiB ({total / 2 / 1e9:.2f}B bf16 parameters, {shards} shards) to {folder} "
              f"in {time.perf_counter() - start:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs\n")
        print("| load | seconds | baseline RSS GiB | peak RSS GiB | peak - baseline GiB | (peak - baseline) / "
              "checkpoint | anon / file RSS at end GiB |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            out = measure(folder, row)
            extra = out["peak"] - out["baseline"]
            print(f"| {row} | {out['seconds']:.1f} | {out['baseline'] / GIB:.2f} | {out['peak'] / GIB:.2f} | "
                  f"{extra / GIB:.2f} | {extra / total:.2f} | {out['anon'] / GIB:.2f} / {out['file'] / GIB:.2f} |",
                  flush=True)
    finally:
        if args.keep:
            print(f"\nkept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
