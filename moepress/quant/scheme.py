"""What moepress needs to know about one on-disk quantisation format: which stored tensors encode a
weight, how to turn them into a float tensor and back, and what the output's `quantization_config` says.

A scheme sees checkpoint tensor names (the on-disk layout, as `save_pretrained` writes it), never model
classes: the same code reads a checkpoint for calibration, streams it layer by layer, and rewrites a
compressed output in the input's format (`moepress.quant.requantize`)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

import torch

_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def pattern(name: str) -> str:
    """`model.layers.3.mlp.experts.7.up_proj.weight` → `model.layers.*.mlp.experts.*.up_proj.weight`:
    the name class a new tensor shares with the source's (merged experts are quantised like experts)."""
    return _INDEX.sub("*", name)


class Scheme:
    """One quantisation format (subclasses register in `moepress.quant.SCHEMES`)."""

    name: ClassVar[str]  # what the manifest and errors call it
    #: the axis of a stored tensor that indexes experts when one tensor holds all of a layer's experts
    #: (gpt-oss MXFP4); None: one stored tensor per expert
    expert_axis: ClassVar[int | None] = None
    #: the relative (Frobenius) error a freshly quantised weight may have when an output is verified
    tolerance: ClassVar[float] = 0.1

    def __init__(self, config: dict):
        self.config = dict(config)

    @classmethod
    def matches(cls, config: dict) -> bool:
        """Whether a checkpoint's `quantization_config` is in this format."""
        raise NotImplementedError

    def logical_names(self, stored: Iterable[str]) -> dict[str, list[str]]:
        """{weight name as a float checkpoint holds it: the stored tensors that encode it} for every
        quantised weight among `stored` (tensors missing from the map are stored as they are)."""
        raise NotImplementedError

    def stored_names(self, name: str) -> list[str]:
        """The stored tensors a quantised weight `name` is written as (its scales included)."""
        raise NotImplementedError

    def dequantize(self, name: str, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The float weight `name` from its stored tensors (keyed by stored name)."""
        raise NotImplementedError

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of a new weight `name` in this format."""
        raise NotImplementedError

    def check(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        """Raise MoepressError if the stored tensors of `name` cannot be this format (scale shapes...)."""

    def output_config(self, unquantised: list[str]) -> dict:
        """The output's `quantization_config`: the input's, with the new weights written unquantised
        (`unquantised`, module names) excluded from conversion."""
        raise NotImplementedError

    def transformers_config(self):
        """transformers' quantization config that dequantises this format on load (CPU included)."""
        raise NotImplementedError
