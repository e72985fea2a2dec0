"""Checkpoints: one loader, one adapter per format. Only this package knows foreign key names."""

from blip2.weights.load import load_pretrained
from blip2.weights.loader import LoadReport, WeightLoadError, load_into, read_state_dict, save_pretrained

__all__ = ["LoadReport", "WeightLoadError", "load_into", "load_pretrained", "read_state_dict", "save_pretrained"]
