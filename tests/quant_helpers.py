"""What the quantised-checkpoint tests read back: every weight tensor of a folder as stored, and bit equality."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's weight shards (`model*.safetensors`), as stored."""
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
