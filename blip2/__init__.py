"""BLIP-2 in PyTorch: stage-1 and stage-2 training, evaluation and inference."""

from blip2.config import Blip2Config, QformerConfig, ViTConfig
from blip2.models import Blip2ImageToTextGeneration, Blip2Output, Blip2Qformer, Blip2Stage2Output
from blip2.processing import Blip2GenerationProcessor, Blip2ImageProcessor, Blip2Processor

__version__ = "0.1.0"


def __getattr__(name: str):
    # the engine and pipelines pull in the data stack: import them only when asked for
    if name == "Trainer":
        from blip2.engine.trainer import Trainer

        return Trainer
    if name == "pipeline":
        from blip2.pipelines import pipeline

        return pipeline
    raise AttributeError(f"module 'blip2' has no attribute {name!r}")


__all__ = ["Blip2Config", "QformerConfig", "ViTConfig", "Blip2Qformer", "Blip2ImageToTextGeneration", "Blip2Output",
           "Blip2Stage2Output", "Blip2ImageProcessor", "Blip2Processor", "Blip2GenerationProcessor", "Trainer",
           "pipeline"]
