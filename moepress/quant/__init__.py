"""Quantised checkpoints in and out: read block-FP8 / MXFP4 / compressed-tensors inputs dequantised, and
write an output in its input's format (sliced tensors copied with their scales, new ones quantised)."""

from __future__ import annotations

import json
from pathlib import Path

from moepress.errors import MoepressError
from moepress.quant.block_fp8 import BlockFP8
from moepress.quant.compressed_tensors import CompressedTensors
from moepress.quant.mxfp4 import MXFP4
from moepress.quant.scheme import Scheme

#: formats moepress reads, first match wins (more register from their modules)
SCHEMES: list[type[Scheme]] = [BlockFP8, MXFP4, CompressedTensors]


def scheme_for(config: dict) -> Scheme | None:
    """The Scheme of a checkpoint config (a dict of config.json), None if it is not quantised."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    for cls in SCHEMES:
        if cls.matches(qc):
            return cls(qc)
    known = ", ".join(cls.name for cls in SCHEMES)
    raise MoepressError(
        f"quantization {qc.get('quant_method')!r} ({qc.get('format') or qc.get('fmt') or 'no format'}) is not one "
        f"moepress reads ({known}); dequantise the checkpoint to bf16 first"
    )


def folder_scheme(folder: str | Path) -> Scheme | None:
    """The Scheme of a local checkpoint folder (None: unquantised or not a local folder)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    return scheme_for(json.loads(path.read_text()))


__all__ = ["SCHEMES", "Scheme", "folder_scheme", "scheme_for"]
