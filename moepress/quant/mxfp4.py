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
#: magnitude code of twice a magnitude code's value (for codes up to 3.0)
_DOUBLE = (0, 2, 4, 5, 6, 7)


class MXFP4(Scheme):
    name = "mxfp4"
    expert_axis = 0

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
        transformers' `convert_moe_packed_tensors` gives, bit for bit (computed in float32, where every
        MXFP4 value is exact, one expert at a time to bound the float32 temporary)."""
        self.check(name, stored)
        blocks, scales = stored[name + BLOCKS], stored[name + SCALES]
        *lead, rows, groups, half = blocks.shape
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
        flat_blocks = blocks.reshape(-1, rows, groups, half)
        flat_scales = scales.reshape(-1, rows, groups)
        out = torch.empty(flat_blocks.shape[0], groups * GROUP, rows, dtype=dtype, device=blocks.device)
        for e in range(flat_blocks.shape[0]):
            b = flat_blocks[e]
            values = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # [R, G, 16, 2]
            values = torch.ldexp(values.reshape(rows, groups, GROUP), flat_scales[e].to(torch.int32)[..., None] - BIAS)
            out[e] = values.reshape(rows, groups * GROUP).t().to(dtype)
        return out.reshape(*lead, groups * GROUP, rows)

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """A float weight [..., K, R] (K a multiple of 32) → blocks [..., R, K/32, 16] and scales [..., R, K/32].

        Per group of 32 input values: the scale is the smallest power of two 2^s with amax / 2^s <= 6
        (s = ceil(log2(fl32(amax / 6))), triton_kernels' `downcast_to_mxfp_torch` with its default
        ROUND_UP, which transformers and vLLM use to quantise gpt-oss); values round to the nearest e2m1,
        ties away from zero, signs kept (-0 included). A group whose largest code is then 3 or less is
        renormalised (scale halved, codes doubled: the same values), so the codes of every group are
        canonical and `quantize(dequantize(q)) == q` for whatever this writes — and for any stored group
        whose largest magnitude is 4 or 6. The dequantised values are triton_kernels' exactly."""
        w = weight.detach().to(torch.float32)
        if w.dim() < 2:
            raise MoepressError(f"MXFP4 weight {name} has shape {tuple(w.shape)}; it needs [..., in, out]")
        *lead, k, rows = w.shape
        if k % GROUP:
            raise MoepressError(
                f"MXFP4 weight {name} has {k} input features, not a multiple of {GROUP}; MXFP4 cannot store it — "
                "write it unquantised (modules_to_not_convert)"
            )
        if not torch.isfinite(w).all():
            raise MoepressError(f"MXFP4 weight {name} has inf or NaN values; it cannot be quantised")
        groups = k // GROUP
        x = w.transpose(-1, -2).contiguous().reshape(*lead, rows, groups, GROUP)
        amax = x.abs().amax(dim=-1)
        # the exponent of fl32(amax / 6) rounded up to a power of two: add the largest mantissa to the bits
        ds = (amax / 6.0).contiguous().view(torch.int32)
        exponent = ((ds + 0x007FFFFF) >> 23).clamp(max=254)  # biased; 0 only for an all-zero group
        # x / 2^(exponent - 127), exact (0 for an all-zero group, whose signs survive)
        factor = torch.where(exponent > 0, torch.ldexp(torch.ones_like(amax), BIAS - exponent), 0.0)
        q = x * factor[..., None]
        mids = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=w.device)
        code = torch.bucketize(q.abs(), mids, right=True)  # magnitude code 0..7
        double = torch.tensor(_DOUBLE + (7, 7), dtype=code.dtype, device=w.device)
        for _ in range(8):  # only groups of tiny amax (below 3·2^-126) need more than one halving
            halve = (code.amax(dim=-1) <= 5) & (code.amax(dim=-1) > 0) & (exponent > 0)
            if not halve.any():
                break
            exponent = exponent - halve.to(exponent.dtype)
            code = torch.where(halve[..., None], double[code], code)
        code = code.to(torch.uint8) | (torch.signbit(q).to(torch.uint8) << 3)
        pairs = code.reshape(*lead, rows, groups, GROUP // 2, 2)
        blocks = pairs[..., 0] | (pairs[..., 1] << 4)
        return {name + BLOCKS: blocks.contiguous(), name + SCALES: exponent.to(torch.uint8).contiguous()}

    def output_config(self, unquantised: list[str]) -> dict:
        config = dict(self.config)
        if unquantised:
            config["modules_to_not_convert"] = sorted({*(config.get("modules_to_not_convert") or []), *unquantised})
        return config

    def transformers_config(self):
        from transformers import Mxfp4Config

        return Mxfp4Config(modules_to_not_convert=self.config.get("modules_to_not_convert"), dequantize=True)
