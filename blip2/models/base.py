"""What both BLIP-2 models share: presets, loading and saving, frozen towers, and the image path
(ViT -> ln_vision -> Q-Former queries)."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from blip2 import registry
from blip2.config import Blip2Config, QformerConfig
from blip2.nn.qformer import Qformer, QformerOutput
from blip2.nn.vit import VisionTransformer
from blip2.weights import load_pretrained, save_pretrained


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None:
                nn.init.zeros_(sub.bias)
            if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
                nn.init.zeros_(sub.weight[sub.padding_idx])
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def init_qformer_weights(qformer: Qformer, config: QformerConfig) -> None:
    """BERT's initialisation with ``config.initializer_range``, then each cross-attention block's query and key
    projections drawn with ``config.cross_attention_init_std`` (the scale of its initial attention logits)."""
    init_bert_weights(qformer, std=config.initializer_range)
    for block in qformer.cross_attention_blocks():
        nn.init.normal_(block.attn.q_proj.weight, std=config.cross_attention_init_std)
        nn.init.normal_(block.attn.k_proj.weight, std=config.cross_attention_init_std)


class Blip2PreTrainedModel(nn.Module):
    """Base class: ``from_pretrained`` / ``save_pretrained`` / ``show_support_list``, the freezing policy and the
    image path both stages share (``encode_image``, ``query_forward``)."""

    # the registry group(s) this class's presets belong to ("stage1"; "stage2" and "itt")
    preset_group: str | tuple[str, ...] = ""

    def __init__(self, config: Blip2Config) -> None:
        super().__init__()
        self.config = config
        # where from_pretrained read the model (a preset name or a path; None when built from a config): pipelines
        # and the Trainer find the processor saved with it there (image settings, vocabulary, LLM tokenizer)
        self.name_or_path: str | None = None

    def build_image_path(self, with_text: bool) -> None:
        """ViT, ln_vision, the learned queries and the Q-Former (``with_text=False``: its query path only).

        Modules only, at their default initialisation: each model initialises them in its own order.
        """
        vision, qformer = self.config.vision_config, self.config.qformer_config
        self.vision_model = VisionTransformer(vision)
        self.ln_vision = nn.LayerNorm(vision.hidden_size, eps=vision.ln_vision_eps)
        self.query_tokens = nn.Parameter(torch.zeros(1, qformer.query_length, qformer.hidden_size))
        self.qformer = Qformer(qformer, image_hidden_size=vision.hidden_size, with_text=with_text)

    # --- image path ----------------------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> ln_vision(ViT(pixels)) (B, N, D_img); no gradient into a frozen ViT.

        H and W must be the model's ``vision_config.image_size`` unless ``interpolate_pos_encoding`` (the ViT's
        position table is then resized bicubically to the image's patch grid)."""
        if self.config.freeze_vision:
            with torch.no_grad():
                vit_out = self.vision_model(pixel_values, interpolate_pos_encoding)
        else:
            vit_out = self.vision_model(pixel_values, interpolate_pos_encoding)
        return self.ln_vision(vit_out)

    def query_forward(self, image_embeds: torch.Tensor, use_cache: bool = False) -> QformerOutput:
        """The queries read the image: (B, N, D_img) -> query outputs (B, Q, D) (+ their self-attention K/V)."""
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(query_embeds=query_tokens, image_embeds=image_embeds, use_cache=use_cache)

    # --- presets and weights -------------------------------------------------------------------------------------
    @classmethod
    def show_support_list(cls) -> list[str]:
        """Print and return the preset names this class can be built from."""
        names = registry.names(cls.preset_group)
        print(f"{cls.__name__} supports: {names}")
        return names

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, config: Blip2Config | None = None, **kwargs):
        """Build from a preset name, one of our folders, a Hugging Face BLIP-2 folder or a LAVIS ``.pth``."""
        model = load_pretrained(cls, name_or_path, config=config, **kwargs)
        if model.name_or_path is None:  # a preset without weight files: its name still finds its processor
            model.name_or_path = str(name_or_path)
        return model

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> None:
        """Write ``config.yaml`` and ``model.safetensors`` to ``directory``; a folder holding files blip2 did not
        write is refused unless ``overwrite`` (which replaces only our files there and deletes nothing)."""
        save_pretrained(self, directory, overwrite=overwrite)

    # --- freezing ------------------------------------------------------------------------------------------------
    def frozen_modules(self) -> list[nn.Module]:
        """Sub-modules that stay in eval mode with no gradients (overridden by each model)."""
        return []

    def apply_freezing(self) -> None:
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # a frozen tower never runs dropout or updates statistics
        return self

    def autocast(self, device: torch.device):
        """bf16/fp16 autocast on CUDA per ``config.compute_dtype``; CPU runs in float32."""
        dtype = self.config.compute_dtype
        if device.type != "cuda" or dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, dtype))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
