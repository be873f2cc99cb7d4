"""MXFP4 (gpt-oss: `quant_method: mxfp4`): the routed experts of a layer, all of them in one tensor,
as OCP microscaling FP4 — groups of 32 consecutive input-dimension values sharing one power-of-two scale.

On disk (transformers 5.24, `integrations/mxfp4.py`), for `W` = `...mlp.experts.gate_up_proj` or `down_proj`:
- `W_blocks` uint8 [E, R, K/32, 16]: e2m1 codes, two per byte, the LOW nibble first (element 2j in
  the low nibble, 2j+1 in the high one); code bit 3 is the sign, bits 0-2 index
  0, 0.5, 1, 1.5, 2, 3, 4, 6;
- `W_scales` uint8 [E, R, K/32]: e8m0 exponents, value 2^(byte - 127);
- the float weight is [E, K, R] (the model multiplies `x @ W[e]`): `gate_up_proj` [E, H, 2I] (gate and
  up columns interleaved, as the blocks' rows are), `down_proj` [E, I, H]; blocks/scales hold it
  transposed, rows = output features R, groups along the input features K.
Experts are axis 0 of the stored tensors and of the float one (`expert_axis = 0`): expert e's slice
of the blocks and scales encodes expert e's slice of the weight. The biases stay bf16 (not quantised).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moepress.errors import MoepressError
from moepress.quant.scheme import Scheme

BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32  # values sharing one scale
BIAS = 127  # e8m0 exponent bias
#: e2m1 code → value (bit 3: sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: the midpoints between consecutive e2m1 magnitudes: a magnitude's code is how many of them it reaches
#: (round to nearest, ties away from zero, as triton_kernels' `downcast_to_mxfp_torch`)
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
#: magnitude code of twice a magnitude code's value (codes up to 3.0; the rest are never doubled)
_DOUBLE = (0, 2, 4, 5, 6, 7, 7, 7)
#: magnitude code of a magnitude m in [0, 6] from floor(4m) (every midpoint is a multiple of 1/4)
_QUARTERS = tuple(sum(4 * q <= i for q in _MIDPOINTS) for i in range(25))


class MXFP4(Scheme):
    name = "mxfp4"
    expert_axis = 0
    tolerance = 0.25  # 4-bit codes under a power-of-two scale per 32 values: ~0.1 relative RMS on Gaussian weights

    @classmethod
    def matches(cls, config: dict) -> bool:
        return config.get("quant_method") == "mxfp4"

    def logical_names(self, stored: Iterable[str]) -> dict[str, list[str]]:
        names = set(stored)
        out = {}
        for n in names:
            if n.endswith(BLOCKS):
                base = n[: -len(BLOCKS)]
                if base + SCALES in names:
                    out[base] = [n, base + SCALES]
        return out

    def stored_names(self, name: str) -> list[str]:
        return [name + BLOCKS, name + SCALES]

    def check(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        blocks, scales = stored.get(name + BLOCKS), stored.get(name + SCALES)
        missing = [n for n, t in ((name + BLOCKS, blocks), (name + SCALES, scales)) if t is None]
        if missing:
            raise MoepressError(f"MXFP4 weight {name} has no {' or '.join(missing)}; the checkpoint is incomplete")
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise MoepressError(
                f"MXFP4 weight {name} is stored as {blocks.dtype}/{scales.dtype}, not uint8 blocks and uint8 scales; "
                "the checkpoint is not in gpt-oss's MXFP4 layout (dequantise it to bf16 first)"
            )
        if blocks.dim() < 3 or blocks.shape[-1] != GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
            raise MoepressError(
                f"{name + BLOCKS} {tuple(blocks.shape)} and {name + SCALES} {tuple(scales.shape)} are not MXFP4's "
                f"[E, rows, groups, {GROUP // 2}] and [E, rows, groups]; check that the checkpoint is gpt-oss MXFP4 "
                "and its shards are complete"
            )

    def dequantize(self, name: str, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """[..., R, G, 16] codes + [..., R, G] exponents → [..., G·32, R] in `dtype`: the value
        transformers' `convert_moe_packed_tensors` gives, bit for bit (code value × 2^(byte - 127) in
        float32, then `dtype`), one expert at a time to bound the float32 temporary."""
        self.check(name, stored)
        blocks, scales = stored[name + BLOCKS], stored[name + SCALES]
        *lead, rows, groups, half = blocks.shape
        pairs = _byte_values(blocks.device)
        flat_blocks = blocks.reshape(-1, rows, groups, half)
        flat_scales = scales.reshape(-1, rows, groups)
        out = torch.empty(flat_blocks.shape[0], groups * GROUP, rows, dtype=dtype, device=blocks.device)
        for e in range(flat_blocks.shape[0]):
            codes = flat_blocks[e].reshape(-1).to(torch.int32)
            values = pairs.index_select(0, codes).view(rows, groups, GROUP)  # low nibble first
            exponent = flat_scales[e].to(torch.int32) - BIAS
            # × 2^exponent as ldexp does it; byte 255 (2^128, past float32) as × 2^127 × 2
            factor = torch.ldexp(torch.ones(exponent.shape, device=values.device), exponent.clamp(max=127))
            values.mul_(factor[..., None])
            top = exponent == 128
            if top.any():
                values[top] *= 2
            out[e] = values.view(rows, groups * GROUP).to(dtype).t()
        return out.reshape(*lead, groups * GROUP, rows)

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float weight [..., K, R] (K a multiple of 32) → blocks [..., R, K/32, 16] and scales [..., R, K/32].

        Per group of 32 input values: the scale is the smallest power of two 2^s with amax / 2^s <= 6
        (s = ceil(log2(fl32(amax / 6))), triton_kernels' `downcast_to_mxfp_torch` with its default
        ROUND_UP, which transformers and vLLM use to quantise gpt-oss); values round to the nearest e2m1,
        ties away from zero, signs kept (-0 included). A group whose largest code is then 3 or less is
        renormalised (scale halved, codes doubled: the same values), so the codes of every group are
        canonical and `quantize(dequantize(q)) == q` for whatever this writes — and for any stored group
        whose largest magnitude is 4 or 6 (groups of amax below 2^-124, a scale byte of 0, aside). The
        dequantised values are triton_kernels' exactly."""
        if weight.dim() < 2:
            raise MoepressError(f"MXFP4 weight {name} has shape {tuple(weight.shape)}; it needs [..., in, out]")
        *lead, k, rows = weight.shape
        if k % GROUP:
            raise MoepressError(
                f"MXFP4 weight {name} has {k} input features, not a multiple of {GROUP}; MXFP4 cannot store it — "
                "write it unquantised (modules_to_not_convert)"
            )
        if not torch.isfinite(weight).all():
            raise MoepressError(f"MXFP4 weight {name} has inf or NaN values; it cannot be quantised")
        flat = weight.detach().reshape(-1, k, rows)
        blocks = torch.empty(flat.shape[0], rows, k // GROUP, GROUP // 2, dtype=torch.uint8, device=weight.device)
        scales = torch.empty(flat.shape[0], rows, k // GROUP, dtype=torch.uint8, device=weight.device)
        for e in range(flat.shape[0]):  # one expert at a time: float32 temporaries of one [K, R] slice
            blocks[e], scales[e] = _quantize_2d(flat[e])
        return {name + BLOCKS: blocks.reshape(*lead, *blocks.shape[1:]),
                name + SCALES: scales.reshape(*lead, *scales.shape[1:])}

    def output_config(self, unquantised: list[str]) -> dict:
        config = dict(self.config)
        if unquantised:
            config["modules_to_not_convert"] = sorted({*(config.get("modules_to_not_convert") or []), *unquantised})
        return config

    def transformers_config(self):
        from transformers import Mxfp4Config

        return Mxfp4Config(modules_to_not_convert=self.config.get("modules_to_not_convert"), dequantize=True)


def _byte_values(device) -> torch.Tensor:
    """[256, 2] float32: the two values a byte of blocks holds, its low nibble's first."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    byte = torch.arange(256)
    return torch.stack((lut[byte & 0x0F], lut[byte >> 4]), dim=-1).to(device)


def _quantize_2d(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One [K, R] weight → blocks [R, K/32, 16], scales [R, K/32] (see `MXFP4.quantize`)."""
    k, rows = w.shape
    x = w.t().to(torch.float32).contiguous().view(rows, k // GROUP, GROUP)
    amax = x.abs().amax(dim=-1)
    # the exponent of fl32(amax / 6) rounded up to a power of two: add the largest mantissa to the bits
    exponent = (((amax / 6.0).view(torch.int32) + 0x007FFFFF) >> 23).clamp(max=254)  # biased; 0: all-zero group
    # |x| / 2^(exponent - 127), exact (0 for an all-zero group)
    factor = torch.where(exponent > 0, torch.ldexp(torch.ones_like(amax), BIAS - exponent), 0.0)
    quarters = x.abs().mul_(factor[..., None]).mul_(4).clamp_(max=24).to(torch.int32)  # floor(4·|q|)
    code = torch.tensor(_QUARTERS, dtype=torch.uint8, device=w.device).index_select(0, quarters.view(-1))
    code = code.view(rows, k // GROUP, GROUP)
    double = torch.tensor(_DOUBLE, dtype=torch.uint8, device=w.device)
    for _ in range(8):  # one halving at most, but for groups of amax below 3·2^-126
        top = code.amax(dim=-1)
        halve = (top <= 5) & (top > 0) & (exponent > 0)
        if not halve.any():
            break
        exponent = exponent - halve.to(exponent.dtype)
        code[halve] = double[code[halve].long()]
    code |= torch.signbit(x).to(torch.uint8) << 3
    pairs = code.view(rows, k // GROUP, GROUP // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), exponent.to(torch.uint8)
