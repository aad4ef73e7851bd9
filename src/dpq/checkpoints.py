"""Thin alias kept for the documented entry point ``dpq.checkpoints.load_model``: saving and reloading
models lives in :mod:`dpq.models.io`."""

from dpq.models.io import load_model, load_shrunk_pretrained, save_model

__all__ = ["load_model", "load_shrunk_pretrained", "save_model"]
