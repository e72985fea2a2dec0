"""Caption, retrieval and classification data sets, batch collation and the generated shapes data set."""

from blip2.data.captions import (
    ImageCaptionDataset,
    MultiImgCapDataLoader,
    RetrievalEvalDataset,
    read_annotations,
)
from blip2.data.classification import Cifar100Dataset, ImageFolderDataset, readable_class_name
from blip2.data.collate import ImageCaptionLMCollator, ImageCollator, ImageTextCollator
from blip2.data.shapes import ShapesDatasetInfo, generate_shapes_dataset, shapes_caption_fields

__all__ = [
    "MultiImgCapDataLoader",
    "ImageCaptionDataset",
    "RetrievalEvalDataset",
    "read_annotations",
    "ImageFolderDataset",
    "Cifar100Dataset",
    "readable_class_name",
    "ImageCaptionLMCollator",
    "ImageTextCollator",
    "ImageCollator",
    "ShapesDatasetInfo",
    "generate_shapes_dataset",
    "shapes_caption_fields",
]
