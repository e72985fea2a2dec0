"""Caption, retrieval and classification data sets, tar shards (write and stream), batch collation and the generated
shapes data set."""

from blip2.data.captions import (
    ImageCaptionDataset,
    MultiImgCapDataLoader,
    RetrievalEvalDataset,
    read_annotations,
)
from blip2.data.classification import Cifar100Dataset, ImageFolderDataset, readable_class_name
from blip2.data.collate import ImageCaptionLMCollator, ImageCollator, ImageTextCollator
from blip2.data.shapes import ShapesDatasetInfo, generate_shapes_dataset, shapes_caption_fields
from blip2.data.shards import ShardedCaptions, annotation_images, folder_images, read_manifest, write_shards

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
    "ShardedCaptions",
    "write_shards",
    "annotation_images",
    "folder_images",
    "read_manifest",
]
