"""What a model in memory weighs: parameters and bytes, counted as a checkpoint stores them.

Every parameter and persistent buffer once (tied weights once), in its own dtype: what
`save_pretrained` writes. Below both `surgery` (which records each component's bytes before and
after) and `io` (which writes them into the manifest and predicts them for a plan, `io.sizes`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moepress.models import Adapter


@dataclass(frozen=True)
class Size:
    params: int
    bytes: int


def saved_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor a checkpoint stores: parameters (tied ones once) and
    persistent buffers such as DeepSeek-V3's `e_score_correction_bias`."""
    yield from model.named_parameters()
    for mod_name, mod in model.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def size_of(model: nn.Module) -> Size:
    params = nbytes = 0
    for _, t in saved_tensors(model):
        params += t.numel()
        nbytes += t.numel() * t.element_size()
    return Size(params, nbytes)


def size_by_component(model: nn.Module, adapter: Adapter) -> tuple[dict[str, int], dict[str, int]]:
    """(parameters, bytes) per `adapter.component`, each with a 'total'."""
    params: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    for name, t in saved_tensors(model):
        c = adapter.component(name)
        params[c] += t.numel()
        nbytes[c] += t.numel() * t.element_size()
    params["total"] = sum(params.values())
    nbytes["total"] = sum(nbytes.values())
    return dict(params), dict(nbytes)
