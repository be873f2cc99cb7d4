"""compressed-tensors checkpoints (`quant_method: compressed-tensors`, written by llm-compressor and by
`moepress compress --quantize`): each quantised module `M` stores its weight as a few tensors named
`M.weight*`, laid out by the format of its config group:

- `float-quantized` / `naive-quantized` / `int-quantized` (FP8-dynamic, W8A8): `M.weight` in float8 or
  int8 and `M.weight_scale` (per tensor [1], per channel [out, 1], per group [out, in/g], per block);
- `pack-quantized` (W4A16, W8A16): `M.weight_packed` int32 [out, ceil(in·bits/32)], `M.weight_scale`,
  `M.weight_shape` ([out, in]) and, asymmetric, `M.weight_zero_point`;
- `nvfp4-pack-quantized` (NVFP4): `M.weight_packed` uint8 [out, in/2], `M.weight_scale` float8 [out, in/16]
  and `M.weight_global_scale` [1]; static activations add `M.input_global_scale`.

The tensors are (de)compressed by the `compressed-tensors` library's per-module compressors
(`BaseCompressor.get_value_from_registry(format).compress/decompress`), so moepress reads exactly what
vLLM and transformers read; moepress computes only the scales of new weights (min/max, as
llm-compressor's data-free observers do). Needs `pip install moepress[quant]`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from functools import cached_property

import torch

from moepress.errors import MoepressError
from moepress.quant.scheme import Scheme

QUANT_METHOD = "compressed-tensors"
INSTALL = "pip install 'moepress[quant]' (or pip install compressed-tensors)"
#: the suffixes a quantised module's weight is stored under (after `M.`), in the order the formats use them
WEIGHT_PARTS = ("weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_global_scale",
                "weight_shape", "weight_g_idx")
#: static activation scales: calibration results that belong to the module, not to a float model
ACTIVATION_PARTS = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point")
#: formats whose on-disk layout moepress has checked (the library may know more)
FORMATS = ("float-quantized", "naive-quantized", "int-quantized", "pack-quantized", "nvfp4-pack-quantized")


def library():
    """The compressed-tensors modules moepress uses, or a one-line error naming the install."""
    try:
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig
        from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    except ImportError:
        raise MoepressError(f"compressed-tensors checkpoints need the compressed-tensors library: {INSTALL}") from None
    return BaseCompressor, QuantizationConfig, calculate_qparams, generate_gparam


def _module(name: str) -> tuple[str, str]:
    """`a.b.weight_scale` → (`a.b`, `weight_scale`)."""
    module, _, part = name.rpartition(".")
    return module, part


class CompressedTensors(Scheme):
    name = "compressed-tensors"

    def __init__(self, config: dict):
        super().__init__(config)
        _, QuantizationConfig, _, _ = library()
        try:
            self.qc = QuantizationConfig.model_validate(
                {k: v for k, v in config.items() if k not in ("dequantize", "run_compressed")}
            )
        except Exception as err:  # noqa: BLE001 - pydantic's message, on one line
            first = str(err).split("\n")[0]
            raise MoepressError(f"quantization_config is not a valid compressed-tensors config: {first}") from None
        self.groups = []  # (regex targets, class-name targets, scheme, format)
        for key, scheme in (self.qc.config_groups or {}).items():
            fmt = _fmt(scheme.format or self.qc.format)
            if scheme.weights is None:
                continue  # activations only: the weights stay float
            if fmt not in FORMATS:
                raise MoepressError(
                    f"compressed-tensors format {fmt!r} (config group {key}) is not one moepress reads "
                    f"({', '.join(FORMATS)}); dequantise the checkpoint first"
                )
            scheme.format = fmt
            regex = [re.compile(t[3:]) for t in scheme.targets if t.startswith("re:")]
            names = [t for t in scheme.targets if not t.startswith("re:")]
            self.groups.append((regex, names, scheme, fmt))
        if not self.groups:
            raise MoepressError("the compressed-tensors config quantises no weights (no config group has weights)")
        self.ignore = [re.compile(i[3:]) if i.startswith("re:") else i for i in (self.qc.ignore or [])]

    @classmethod
    def matches(cls, config: dict) -> bool:
        return config.get("quant_method") == QUANT_METHOD

    # ---- which group quantises a module ---------------------------------------------------------
    def group_of(self, module: str):
        """(scheme, format) of the config group that quantises `module`: a group whose `re:` target
        matches its name first, else the first group with class-name targets (`Linear`: every linear,
        which is what a checkpoint's per-module weights are). Like transformers' and vLLM's matching."""
        for regex, _, scheme, fmt in self.groups:
            if any(r.fullmatch(module) or r.match(module) for r in regex):
                return scheme, fmt
        for _, names, scheme, fmt in self.groups:
            if names:
                return scheme, fmt
        return self.groups[0][2], self.groups[0][3]

    def ignored(self, module: str) -> bool:
        """Whether the config's `ignore` list names `module` (exactly, as a suffix, or by `re:` regex)."""
        for i in self.ignore:
            if isinstance(i, str):
                if module == i or module.endswith("." + i):
                    return True
            elif i.fullmatch(module) or i.match(module):
                return True
        return False

    # ---- names ------------------------------------------------------------------------------------
    def logical_names(self, stored: Iterable[str]) -> dict[str, list[str]]:
        names = set(stored)
        by_module: dict[str, list[str]] = {}
        for n in names:
            module, part = _module(n)
            if part in WEIGHT_PARTS or part in ACTIVATION_PARTS:
                by_module.setdefault(module, []).append(n)
        out = {}
        for module, parts in by_module.items():
            local = {_module(p)[1] for p in parts}
            # a quantised weight: packed, or a stored weight with its scale (a float weight has neither)
            if "weight_packed" in local or ("weight" in local and "weight_scale" in local):
                out[module + ".weight"] = sorted(parts, key=lambda p: _order(_module(p)[1]))
        return out

    def stored_names(self, name: str) -> list[str]:
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        scheme, fmt = self.group_of(module)
        return [f"{module}.{p}" for p in self._param_names(scheme, fmt)]

    def _param_names(self, scheme, fmt: str) -> tuple[str, ...]:
        BaseCompressor = library()[0]
        try:
            names = tuple(BaseCompressor.get_value_from_registry(fmt).compression_param_names(scheme))
        except NotImplementedError:
            names = ("weight", "weight_scale")
        return names

    # ---- tensors -----------------------------------------------------------------------------------
    def _local(self, name: str, stored: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        prefix = module + "."
        return module, {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}

    def check(self, name: str, stored: dict[str, torch.Tensor]) -> None:
        module, local = self._local(name, stored)
        scheme, fmt = self.group_of(module)
        args = scheme.weights
        packed = fmt in ("pack-quantized", "nvfp4-pack-quantized")
        data = local.get("weight_packed" if packed else "weight")
        if data is None:
            raise MoepressError(f"{module} has no {'weight_packed' if packed else 'weight'}; the {fmt} checkpoint "
                                "is incomplete")
        scale = local.get("weight_scale")
        if scale is None:
            raise MoepressError(f"{fmt} weight {module} has no {module}.weight_scale; the checkpoint is incomplete")
        if fmt == "nvfp4-pack-quantized" and "weight_global_scale" not in local:
            raise MoepressError(f"NVFP4 weight {module} has no {module}.weight_global_scale; the checkpoint is "
                                "incomplete")
        if data.dim() != 2:
            raise MoepressError(f"{module}: a {data.dim()}-D stored weight {tuple(data.shape)}; moepress reads "
                                "per-module 2-D compressed-tensors weights")
        if fmt == "pack-quantized":
            shape = local.get("weight_shape")
            if shape is None:
                raise MoepressError(f"pack-quantized weight {module} has no {module}.weight_shape; the checkpoint is "
                                    "incomplete")
            rows, cols = (int(x) for x in shape.tolist())
            want = (rows, math.ceil(cols * args.num_bits / 32))
            if tuple(data.shape) != want:
                raise MoepressError(f"{module}.weight_packed has shape {tuple(data.shape)}, not {want} for a "
                                    f"{args.num_bits}-bit [{rows}, {cols}] weight")
        elif fmt == "nvfp4-pack-quantized":
            rows, cols = data.shape[0], data.shape[1] * 2
        else:
            rows, cols = data.shape
        want = _scale_shape(args, rows, cols)
        if want is not None and scale.numel() != math.prod(want):
            raise MoepressError(
                f"{module}.weight_scale has shape {tuple(scale.shape)}, not {want} for a [{rows}, {cols}] weight "
                f"quantised per {args.strategy}{f' (group {args.group_size})' if args.group_size else ''}"
            )

    def dequantize(self, name: str, stored: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        self.check(name, stored)
        module, local = self._local(name, stored)
        scheme, fmt = self.group_of(module)
        compressor = library()[0].get_value_from_registry(fmt)
        state = {k: v for k, v in local.items() if k in WEIGHT_PARTS}
        if fmt not in ("pack-quantized", "nvfp4-pack-quantized"):
            state["weight_scale"] = state["weight_scale"].reshape(_scale_shape(scheme.weights, *state["weight"].shape)
                                                                  or state["weight_scale"].shape)
        return compressor.decompress(state, scheme)["weight"].to(dtype)

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The stored tensors of a new weight in its module's group: scales from the weight's min/max
        (llm-compressor's data-free `minmax` observer), compressed by compressed-tensors. Static activation
        scales (`input_scale`, `input_global_scale`) need calibration and are not made here."""
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        scheme, fmt = self.group_of(module)
        local = quantize_weight(weight, scheme, fmt)
        return {f"{module}.{k}": v for k, v in local.items()}

    # ---- configs ---------------------------------------------------------------------------------------
    def output_config(self, unquantised: list[str]) -> dict:
        config = dict(self.config)
        if unquantised:
            modules = [n[: -len(".weight")] if n.endswith(".weight") else n for n in unquantised]
            config["ignore"] = sorted({*(config.get("ignore") or []), *modules})
        return config

    def transformers_config(self):
        """transformers' config that loads this checkpoint as a float model (on CPU too): `dequantize=True`
        (5.x's spelling of `run_compressed=False`) decompresses every weight, per-expert ones included,
        while loading, and leaves plain modules without activation quantisation."""
        from transformers import CompressedTensorsConfig

        if "nvfp4-pack-quantized" in self.formats:
            # its experts converter rebuilds each expert from packed weight, scale and shape, without the
            # global scale: every fused expert would come out scaled wrong (transformers 5.24)
            raise MoepressError(
                "transformers dequantises NVFP4 experts without their global scale; read this checkpoint "
                "with --stream (moepress dequantises it tensor by tensor)"
            )
        config = {k: v for k, v in self.config.items() if k not in ("dequantize", "run_compressed",
                                                                     "use_optimized_inference")}
        return CompressedTensorsConfig(**config, dequantize=True)

    @cached_property
    def formats(self) -> list[str]:
        return sorted({fmt for *_, fmt in self.groups})


def _fmt(fmt) -> str:
    return getattr(fmt, "value", fmt) or "dense"


def _order(part: str) -> int:
    parts = WEIGHT_PARTS + ACTIVATION_PARTS
    return parts.index(part) if part in parts else len(parts)


def _scale_shape(args, rows: int, cols: int) -> tuple[int, ...] | None:
    """The weight_scale shape compressed-tensors gives a [rows, cols] weight (None: a strategy not checked)."""
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "tensor":
        return (1,)
    if strategy == "channel":
        return (rows, 1)
    if strategy in ("group", "tensor_group"):
        return (rows, math.ceil(cols / args.group_size))
    if strategy == "block":
        b0, b1 = args.block_structure
        return (math.ceil(rows / b0), math.ceil(cols / b1))
    return None


def weight_quantizable(args, rows: int, cols: int) -> str | None:
    """Why a [rows, cols] weight cannot take `args` (None: it can)."""
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy in ("group", "tensor_group") and cols % args.group_size:
        return f"{cols} input features are not a multiple of the group size {args.group_size}"
    return None


def quantize_weight(weight: torch.Tensor, scheme, fmt: str) -> dict[str, torch.Tensor]:
    """{local name: tensor} of `weight` [out, in] quantised by `scheme` in `fmt` (compressed-tensors)."""
    BaseCompressor, _, calculate_qparams, generate_gparam = library()
    args = scheme.weights
    if weight.dim() != 2:
        raise MoepressError(f"compressed-tensors quantises 2-D weights, not {tuple(weight.shape)}")
    why = weight_quantizable(args, *weight.shape)
    if why:
        raise MoepressError(f"cannot quantise a {tuple(weight.shape)} weight: {why}")
    w = weight.detach()
    wf = w.float()
    rows, cols = wf.shape
    strategy = getattr(args.strategy, "value", args.strategy)
    if strategy == "tensor":
        lo, hi = wf.min().reshape(1), wf.max().reshape(1)
    elif strategy == "channel":
        lo, hi = wf.amin(1, keepdim=True), wf.amax(1, keepdim=True)
    elif strategy in ("group", "tensor_group"):
        grouped = wf.view(rows, cols // args.group_size, args.group_size)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    elif strategy == "block":
        b0, b1 = args.block_structure
        r, c = math.ceil(rows / b0), math.ceil(cols / b1)
        padded = torch.zeros(r * b0, c * b1)
        padded[:rows, :cols] = wf
        blocks = padded.view(r, b0, c, b1)
        lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    else:
        raise MoepressError(f"moepress does not quantise weights per {strategy}")
    # computed in float32 (exact for a bf16/fp16 weight; CPU rounding of bf16 is also much slower)
    state: dict[str, torch.Tensor] = {"weight": wf}
    global_scale = None
    if strategy == "tensor_group":
        global_scale = generate_gparam(wf.min(), wf.max())
        state["weight_global_scale"] = global_scale
    scale, zero_point = calculate_qparams(lo, hi, args, global_scale=global_scale)
    stored_scale = scale
    if args.scale_dtype is None and w.dtype in (torch.bfloat16, torch.float16):
        stored_scale = scale.to(w.dtype)  # llm-compressor keeps the weight's dtype for scales
        scale = stored_scale.float()  # quantise with the scale a reader will multiply by
    state["weight_scale"] = scale
    if not args.symmetric:
        state["weight_zero_point"] = zero_point
    compressor = BaseCompressor.get_value_from_registry(fmt)
    out = compressor.compress(state, scheme)
    if out.get("weight_scale") is scale:
        out["weight_scale"] = stored_scale
    return {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
