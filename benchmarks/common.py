"""Shared by the benchmark scripts: the configs, synthetic batches, FLOP counts from the shapes, timing, tables.

Not a test helper and not part of the library: speed is measured by running these scripts by hand.
FLOPs are 2 x multiply-adds of the matrix products (linear layers and the two attention products); norms,
softmax, GELU and embeddings are left out, as in the usual MFU accounting.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from blip2.config import Blip2Config, QformerConfig, ViTConfig

CLS_ID, SEP_ID = 101, 102  # bert-base-uncased [CLS] and [SEP]
TEXT_LENGTH = 32  # captions are padded to max_txt_len=32, as in the presets
MEAN_CAPTION_TOKENS = 16  # realistic COCO caption length in word pieces, [CLS] and [SEP] included


# --- configs -------------------------------------------------------------------------------------------------------
def vit_b_config() -> Blip2Config:
    """ViT-B/16 at 224 (86M) + the bert-base Q-Former with 32 queries; the ViT is frozen, as in the presets."""
    vision = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072)
    return Blip2Config(vision_config=vision, qformer_config=QformerConfig(), embed_dim=256, max_txt_len=TEXT_LENGTH)


CONFIGS: dict[str, Callable[[], Blip2Config]] = {
    "tiny": lambda: Blip2Config.from_pretrained("blip2_tiny"),
    "vit-b": vit_b_config,
    "vit-g": lambda: Blip2Config.from_pretrained("blip2_stage1_vit_g"),
}


def parse_list(text: str, kind=str) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def check_config_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config {unknown[0]!r}; available: {', '.join(CONFIGS)}")


# --- synthetic inputs ----------------------------------------------------------------------------------------------
def synthetic_batch(config: Blip2Config, batch: int, device: torch.device, seed: int = 0):
    """Random pixels (B, 3, H, W) and captions of 10-22 tokens ([CLS] ... [SEP]) right-padded to 32: ids, mask."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    lengths = torch.randint(MEAN_CAPTION_TOKENS - 6, MEAN_CAPTION_TOKENS + 7, (batch,), generator=generator)
    words = torch.randint(1000, 30000, (batch, TEXT_LENGTH), generator=generator)
    positions = torch.arange(TEXT_LENGTH)[None]
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = torch.where(positions == lengths[:, None] - 1, SEP_ID, words) * attention_mask
    input_ids[:, 0] = CLS_ID
    return pixel_values.to(device), input_ids.to(device), attention_mask.to(device)


# --- FLOPs from the shapes -----------------------------------------------------------------------------------------
def _linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_len: float, k_len: float, width: int) -> float:
    return 2.0 * 2.0 * q_len * k_len * width  # Q @ K^T and P @ V


def vit_flops(vision: ViTConfig) -> float:
    """Forward FLOPs of the EVA ViT for one image."""
    patches = vision.num_patches
    tokens, width, ffn = patches + 1, vision.hidden_size, vision.intermediate_size
    per_layer = (_linear(tokens, width, 3 * width) + _attention(tokens, tokens, width) + _linear(tokens, width, width)
                 + _linear(tokens, width, ffn) + _linear(tokens, ffn, width))
    return _linear(patches, 3 * vision.patch_size ** 2, width) + vision.num_hidden_layers * per_layer


def qformer_pass_flops(config: Blip2Config, queries: int, text: int, past: int = 0) -> float:
    """Forward FLOPs of one Q-Former pass for one sample: ``queries`` query rows (which cross-attend to the image
    every ``cross_attention_freq`` layers), ``text`` text rows, ``past`` cached key positions."""
    q, vision = config.qformer_config, config.vision_config
    d, rows, image_tokens = q.hidden_size, queries + text, vision.num_patches + 1
    total = 0.0
    for index in range(q.num_hidden_layers):
        total += _linear(rows, d, 3 * d) + _attention(rows, past + rows, d) + _linear(rows, d, d)
        if queries and q.has_cross_attention(index):
            total += (_linear(queries, d, d) + _linear(image_tokens, vision.hidden_size, 2 * d)
                      + _attention(queries, image_tokens, d) + _linear(queries, d, d))
        total += _linear(rows, d, q.intermediate_size) + _linear(rows, q.intermediate_size, d)
    return total


def image_features_flops(config: Blip2Config) -> float:
    """ViT + query pass + vision_proj, per image (``get_image_features``)."""
    q = config.qformer_config
    return (vit_flops(config.vision_config) + qformer_pass_flops(config, q.query_length, 0)
            + _linear(q.query_length, q.hidden_size, config.embed_dim))


def itm_flops(config: Blip2Config, text: int = TEXT_LENGTH) -> float:
    """ViT + joint queries-and-text pass + ITM head, per image-text pair (``itm_logits``)."""
    q = config.qformer_config
    return (vit_flops(config.vision_config) + qformer_pass_flops(config, q.query_length, text)
            + _linear(q.query_length, q.hidden_size, 2))


def itc_flops(config: Blip2Config, batch: int, text: int = TEXT_LENGTH) -> float:
    """Image features + one text pass + text_proj + the (B, B, Q) similarity, per image with B texts per B images."""
    q = config.qformer_config
    return (image_features_flops(config) + qformer_pass_flops(config, 0, text)
            + _linear(1, q.hidden_size, config.embed_dim) + _linear(batch * q.query_length, config.embed_dim, 1))


def qformer_train_forward_flops(config: Blip2Config, batch: int, text: int = TEXT_LENGTH,
                                caption_tokens: float = MEAN_CAPTION_TOKENS) -> float:
    """Forward FLOPs of the stage-1 step after the ViT, per image: query pass, text pass, ITC, ITM on 3B pairs,
    LM pass over the cached queries, LM head on the real target tokens only."""
    q = config.qformer_config
    d, queries, embed = q.hidden_size, q.query_length, config.embed_dim
    itc = (qformer_pass_flops(config, queries, 0) + _linear(queries, d, embed)  # query pass + vision_proj
           + qformer_pass_flops(config, 0, text) + _linear(1, d, embed)  # text pass + text_proj
           + 2 * _linear(batch * queries, embed, 1))  # i2t and t2i similarities
    itm = 3 * (qformer_pass_flops(config, queries, text) + _linear(queries, d, 2))
    targets = caption_tokens - 1
    lm = qformer_pass_flops(config, 0, text, past=queries) + _linear(targets, d, d) + _linear(targets, d, q.vocab_size)
    return itc + itm + lm


def train_flops(config: Blip2Config, batch: int) -> tuple[float, str]:
    """Model FLOPs of one training step per image, and the formula used."""
    vit = vit_flops(config.vision_config)
    qformer = qformer_train_forward_flops(config, batch)
    if config.freeze_vision:
        return vit + 3 * qformer, "ViT_fwd + 3 * QFormer_fwd  (frozen ViT: forward only; backward = 2 x forward)"
    return 3 * (vit + qformer), "3 * (ViT_fwd + QFormer_fwd)  (the ViT trains too)"


# --- devices, timing, memory ---------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def start(device_name: str, threads: int | None, quiet_transformers: bool = False) -> torch.device:
    """What every benchmark does first: pick the device, set the threads, seed, print the machine line; with
    ``quiet_transformers`` transformers' progress bars and warnings are silenced (they would break the table)."""
    if quiet_transformers:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    device = pick_device(device_name)
    used_threads = set_threads(threads)
    torch.manual_seed(0)
    print(machine_note(device) + f"; torch threads: {used_threads}")
    return device


def busy_cores(seconds: float = 0.5) -> float:
    """Cores other processes keep busy now, from two /proc/stat samples (the load average lags by a minute)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy_start, total_start = sample()
        time.sleep(seconds)
        busy_end, total_end = sample()
    except OSError:
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (busy_end - busy_start) / max(1, total_end - total_start)


def set_threads(requested: int | None) -> str:
    """Use ``requested`` CPU threads, or as many cores as other processes leave idle: on a shared box a second
    thread that is often descheduled makes every parallel op wait a scheduler slice (tiny ops then take ms)."""
    if requested:
        torch.set_num_threads(requested)
        return f"{requested} (--threads)"
    busy = busy_cores()
    threads = max(1, min(torch.get_num_threads(), round((os.cpu_count() or 1) - busy)))
    torch.set_num_threads(threads)
    return f"{threads} (auto: other processes kept {busy:.1f} cores busy at start)"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast over fp32 weights, as the Trainer runs; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], object]], iters: int, warmup: int, device: torch.device,
                     min_seconds: float = 1.0) -> dict[str, float]:
    """Median milliseconds of each function over at least ``iters`` runs, more while they fit in ``min_seconds``
    (fast models get enough samples); the functions take turns so a busy machine slows all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def one_round() -> None:
        for name, fn in fns.items():
            samples[name].append(_seconds(fn, device) * 1000)

    one_round()  # also sizes the rest
    round_ms = sum(values[0] for values in samples.values())
    for _ in range(max(iters, min(200, int(min_seconds * 1000 / max(round_ms, 1e-3)))) - 1):
        one_round()
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class PeakMemory:
    """Peak memory over a block: CUDA ``max_memory_allocated``, or on CPU the process's peak RSS (VmHWM, reset via
    /proc/self/clear_refs; where that is refused, the whole-process ``ru_maxrss``)."""

    device: torch.device
    exact: bool = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.exact = False

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.exact:
            with open("/proc/self/status") as handle:
                match = re.search(r"VmHWM:\s+(\d+) kB", handle.read())
            if match:
                return int(match.group(1)) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def machine_note(device: torch.device) -> str:
    """One line naming the device and, on CPU, the threads and the load average (other jobs skew CPU timings)."""
    if device.type == "cuda":
        return f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"device: CPU, {os.cpu_count()} cores, load average {load} (1/5/15 min), torch {torch.__version__}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def add_timing_arguments(parser, unit: str = "runs", peak_use: str | None = "the limit columns",
                         warmup: tuple[int | None, str] = (0, "before timing"),
                         dtype_help: str = "autocast dtype over fp32 weights") -> None:
    """The timing, device and precision flags every benchmark takes (``peak_use=None``: no --peak-tflops)."""
    parser.add_argument("--iters", type=int, default=3, help=f"timed {unit} per measurement; the median is reported")
    parser.add_argument("--warmup", type=int, default=warmup[0], help=f"untimed {unit} {warmup[1]}")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="fast measurements repeat beyond --iters until they fill this many seconds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the cores other processes leave "
                        "idle, at least 1)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help=f"{dtype_help} (default: float32 on CPU, bfloat16 on CUDA)")
    if peak_use:
        parser.add_argument("--peak-tflops", type=float,
                            help=f"the device's dense peak for --dtype, for {peak_use} (default: 989 on CUDA, the "
                                 "H100 SXM bf16 figure; none on CPU)")


def hf_vision_qformer_kwargs(config, text_input: bool) -> tuple[dict, dict]:
    """transformers' vision and Q-Former config kwargs with our config's shapes (both benchmarks build HF BLIP-2)."""
    vision, qformer = config.vision_config, config.qformer_config
    vision_kwargs = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                         num_hidden_layers=vision.num_hidden_layers, num_attention_heads=vision.num_attention_heads,
                         image_size=vision.image_size, patch_size=vision.patch_size,
                         layer_norm_eps=vision.layer_norm_eps, qkv_bias=vision.qkv_bias)
    qformer_kwargs = dict(vocab_size=qformer.vocab_size, hidden_size=qformer.hidden_size,
                          num_hidden_layers=qformer.num_hidden_layers,
                          num_attention_heads=qformer.num_attention_heads,
                          intermediate_size=qformer.intermediate_size,
                          max_position_embeddings=qformer.max_position_embeddings,
                          cross_attention_frequency=qformer.cross_attention_freq,
                          layer_norm_eps=qformer.layer_norm_eps, pad_token_id=qformer.pad_token_id,
                          use_qformer_text_input=text_input)
    return vision_kwargs, qformer_kwargs
