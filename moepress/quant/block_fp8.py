"""Block-scaled FP8 (DeepSeek-V3/R1, Qwen3-*-FP8, `quant_method: fp8` with `weight_block_size`):
each quantised weight `W [out, in]` is stored as `W.weight` in float8_e4m3fn and `W.weight_scale_inv`
in float32 of shape [ceil(out/b0), ceil(in/b1)]: W ≈ weight · scale (per b0×b1 block)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from moepress.errors import MoepressError
from moepress.quant.scheme import Scheme

SCALE = "_scale_inv"
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class BlockFP8(Scheme):
    name = "block-fp8"
    tolerance = 0.08  # e4m3 keeps 3 mantissa bits: at most 1/16 relative per element

    def __init__(self, config: dict):
        super().__init__(config)
        block = config.get("weight_block_size") or (128, 128)
        self.block = (int(block[0]), int(block[1]))
        fmt = config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise MoepressError(f"block FP8 format {fmt!r} is not supported; moepress reads e4m3 checkpoints")

    @classmethod
    def matches(cls, config: dict) -> bool:
        return config.get("quant_method") == "fp8"

    def logical_names(self, stored: Iterable[str]) -> dict[str, list[str]]:
        names = set(stored)
        weights = (n[: -len(SCALE)] for n in names if n.endswith(SCALE))
        return {w: [w, w + SCALE] for w in weights if w in names}

    def stored_names(self, name: str) -> list[str]:
        return [name, name + SCALE]

    def _scale_shape(self, shape: torch.Size) -> tuple[int, int]:
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def check(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        weight, scale = stored[name], stored.get(name + SCALE)
        if scale is None:
            raise MoepressError(f"FP8 weight {name} has no {name + SCALE}; the checkpoint is incomplete")
        if weight.dim() != 2 or tuple(scale.shape) != self._scale_shape(weight.shape):
            raise MoepressError(
                f"{name + SCALE} has shape {tuple(scale.shape)}, not {self._scale_shape(weight.shape)} for a "
                f"{tuple(weight.shape)} weight in {self.block[0]}x{self.block[1]} blocks; check weight_block_size"
            )

    def dequantize(self, name: str, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        self.check(name, stored)
        weight, scale = stored[name], stored[name + SCALE]
        rows, cols = weight.shape
        full = scale.float().repeat_interleave(self.block[0], 0)[:rows].repeat_interleave(self.block[1], 1)[:, :cols]
        return (weight.float() * full).to(dtype)

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per block: scale = amax / 448 (DeepSeek-V3's `weight_quant`), weight = W / scale in e4m3."""
        w = weight.detach().float()
        rows, cols = w.shape
        b0, b1 = self.block
        r, c = self._scale_shape(w.shape)
        padded = torch.zeros(r * b0, c * b1, dtype=torch.float32, device=w.device)
        padded[:rows, :cols] = w
        blocks = padded.view(r, b0, c, b1)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
        q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(r * b0, c * b1)[:rows, :cols]
        return {name: q.to(torch.float8_e4m3fn).contiguous(), name + SCALE: scale.contiguous()}

    def output_config(self, unquantised: list[str]) -> dict:
        config = dict(self.config)
        if unquantised:
            config["modules_to_not_convert"] = sorted({*(config.get("modules_to_not_convert") or []), *unquantised})
        return config

    def transformers_config(self):
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(
            weight_block_size=self.block,
            activation_scheme=self.config.get("activation_scheme", "dynamic"),
            modules_to_not_convert=self.config.get("modules_to_not_convert"),
            dequantize=True,
        )
