"""Checkpoint output: sizes (measured and predicted), the atomic verified writer, and the loader."""

from moepress.io.load import load
from moepress.io.manifest import MANIFEST_FILE, Manifest
from moepress.io.save import PLAN_FILE, save_compressed
from moepress.io.sizes import Size, predict_bytes, predict_size, size_of

__all__ = [
    "MANIFEST_FILE",
    "PLAN_FILE",
    "Manifest",
    "Size",
    "load",
    "predict_bytes",
    "predict_size",
    "save_compressed",
    "size_of",
]
