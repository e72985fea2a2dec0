"""Image transforms, caption cleaning, the Q-Former tokenizer, Blip2Processor (stage 1) and Blip2GenerationProcessor
(stage 2: images and LLM prompts)."""

from blip2.processing.image import (
    PREPROCESSOR_CONFIG,
    Blip2ImageProcessor,
    ImageLoadError,
    load_image,
    random_resized_crop_params,
)
from blip2.processing.processor import Blip2GenerationProcessor, Blip2Processor
from blip2.processing.text import CaptionTransform, clean_caption, clean_question
from blip2.processing.tokenizer import DEC_TOKEN, DEFAULT_VOCAB_FILE, load_tokenizer

__all__ = [
    "PREPROCESSOR_CONFIG",
    "Blip2ImageProcessor",
    "ImageLoadError",
    "load_image",
    "random_resized_crop_params",
    "Blip2Processor",
    "Blip2GenerationProcessor",
    "CaptionTransform",
    "clean_caption",
    "clean_question",
    "DEC_TOKEN",
    "DEFAULT_VOCAB_FILE",
    "load_tokenizer",
]
