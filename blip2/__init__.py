"""BLIP-2 in PyTorch: stage-1 and stage-2 training, evaluation and inference."""

from blip2.config import Blip2Config, QformerConfig, ViTConfig
from blip2.models import Blip2Output, Blip2Qformer

__version__ = "0.1.0"

__all__ = ["Blip2Config", "QformerConfig", "ViTConfig", "Blip2Qformer", "Blip2Output"]
