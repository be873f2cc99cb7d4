"""`moepress_manifest.json`: what a compressed checkpoint was made from and what it saved, by component."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from pydantic import BaseModel, ConfigDict

MANIFEST_FILE = "moepress_manifest.json"


def moepress_version() -> str:
    try:
        return version("moepress")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


class Manifest(BaseModel):
    """Written next to the weights; `bytes_*`/`params_*` are per `Adapter.component`, with 'total'."""

    model_config = ConfigDict(extra="forbid")
    moepress_version: str
    source_fingerprint: str
    source_path: str | None
    plan_method: str
    plain_architecture: bool  # loads with plain transformers, no custom code
    params_before: dict[str, int]
    params_after: dict[str, int]
    bytes_before: dict[str, int]
    bytes_after: dict[str, int]
    # condensed or dropped layers written as the family's own dense MLP (zero-padded), and the bytes
    # of zeros that costs (`surgery.dense`); None: no such layer
    dense_layers: dict[str, Any] | None = None
    # an input in a quantised format (FP8, MXFP4, ...) and an output kept in it (`moepress.quant`): what was
    # copied with its scales, quantised anew or left in float, and the weight shards' bytes as stored
    quantization: dict[str, Any] | None = None
    stored_bytes_before: int | None = None
    stored_bytes_after: int | None = None
