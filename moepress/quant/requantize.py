"""Rewrite a compressed output, written in float by `save_pretrained`, in its input's quantised format.

Every output weight whose value equals a source weight's dequantised value (a kept expert, an
untouched attention projection, a router row set: anything a plan only slices or renames) gets that
source weight's stored tensors, scales included, copied bit for bit under the output's name. Matching is
by value, not by name, so it needs no knowledge of how a plan renumbered experts or which format
(plain, native novices, moepress's own) renamed what: a digest of each source weight dequantised to the
output's dtype, computed one tensor at a time. Weights a plan creates (merged experts, condensed MLPs)
whose name class the source quantised are quantised with the scheme; others (novice vectors, a new
kind of module) stay in float and the output's `quantization_config` excludes them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moepress.errors import MoepressError
from moepress.quant.scheme import Scheme, pattern

INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8,
                       "I8": torch.int8, "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool}


@dataclass
class QuantReport:
    """What the rewrite did, for the manifest."""

    scheme: str
    copied: int = 0  # weights (or expert slices) copied bit for bit with their scales
    quantized: list[str] = field(default_factory=list)  # new weights quantised in the scheme
    unquantized: list[str] = field(default_factory=list)  # new weights left in float (module names)

    def as_dict(self) -> dict:
        return {"scheme": self.scheme, "copied": self.copied, "quantized": self.quantized,
                "unquantized": self.unquantized}


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    data = t.view(torch.uint8) if t.dtype.itemsize else t
    return f"{t.dtype}:{tuple(t.shape)}:{hashlib.blake2b(data.numpy().tobytes(), digest_size=16).hexdigest()}"


class _Shards:
    """Read access to a checkpoint folder's weight shards (the index's, else every top-level file)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            self.weight_map = {}
            for shard in sorted(folder.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})
        self._stack = ExitStack()
        self._files: dict[str, object] = {}

    def _open(self, name: str):
        """The open shard holding `name` (each shard opened once)."""
        shard = self.weight_map[name]
        if shard not in self._files:
            self._files[shard] = self._stack.enter_context(safe_open(self.folder / shard, "pt"))
        return self._files[shard]

    def get(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)

    def get_part(self, name: str, axis: int, index: int) -> torch.Tensor:
        """`get(name).select(axis, index)`, reading only that part where the axis is the first."""
        if axis != 0:
            return self.get(name).select(axis, index)
        return self._open(name).get_slice(name)[index]

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of `name`, from the shard's header (no tensor read)."""
        return _SAFETENSORS_DTYPES.get(self._open(name).get_slice(name).get_dtype(), torch.uint8)

    def close(self) -> None:
        self._stack.close()


Index = dict[str, tuple[str, int | None]]


def source_index(source: Path, scheme: Scheme, dtype: torch.dtype) -> tuple[Index, set[str]]:
    """({digest of a dequantised source weight (or expert slice): (its name, slice)}, name classes the
    source quantised), reading one weight at a time."""
    shards = _Shards(source)
    try:
        logical = scheme.logical_names(shards.weight_map)
        found: dict[str, tuple[str, int | None]] = {}
        for name, stored in logical.items():
            value = scheme.dequantize(name, {s: shards.get(s) for s in stored}, dtype)
            if scheme.expert_axis is None:
                found.setdefault(_digest(value), (name, None))
            else:
                for e, part in enumerate(value.unbind(scheme.expert_axis)):
                    found.setdefault(_digest(part), (name, e))
        return found, {pattern(n) for n in logical}
    finally:
        shards.close()


def requantize_folder(folder: Path, source: Path, scheme: Scheme) -> QuantReport:
    """Rewrite the weight shards of `folder` (written from a model compressed from `source`) in `scheme`,
    in place, and set its config's `quantization_config`."""
    out = _Shards(folder)
    report = QuantReport(scheme.name)
    try:
        # the float dtype the output's weights were written in: digests compare values in it
        dtype = next((t.dtype for t in map(out.get, out.weight_map) if t.dim() == 2 and t.is_floating_point()),
                     torch.bfloat16)
        index, quantised_classes = source_index(source, scheme, dtype)
        src = _Shards(source)
        source_classes = {pattern(n) for n in src.weight_map}
        by_shard: dict[str, dict[str, torch.Tensor]] = {}
        new_map: dict[str, str] = {}
        for name, shard in out.weight_map.items():
            value = out.get(name)
            stored = _encode(name, value, scheme, index, quantised_classes, src, report)
            if stored is None:
                stored = {name: _as_stored(value, src, name)}
                if value.dim() == 2 and name.endswith(".weight") and pattern(name) not in source_classes:
                    report.unquantized.append(name[: -len(".weight")])
            by_shard.setdefault(shard, {}).update(stored)
            new_map.update(dict.fromkeys(stored, shard))
        src.close()
    finally:
        out.close()
    total = 0
    for shard, tensors in by_shard.items():
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if (folder / INDEX).is_file() or len(by_shard) > 1:
        (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=2))
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = scheme.output_config(report.unquantized)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return report


def _as_stored(value: torch.Tensor, src: _Shards, name: str) -> torch.Tensor:
    """`value` in the dtype the source stores the same-named tensor in, where that loses nothing (a router
    a streamed model kept in float32 for a bf16 source: written back as bf16, bit for bit)."""
    if name not in src.weight_map or not value.is_floating_point():
        return value
    dtype = src.dtype(name)
    if dtype == value.dtype or not dtype.is_floating_point:
        return value
    cast = value.to(dtype)
    return cast if torch.equal(cast.to(value.dtype), value) else value


def _encode(name, value, scheme, index, quantised_classes, src, report) -> dict[str, torch.Tensor] | None:
    """The stored tensors of output weight `name` (None: stored as it is). A weight equal to a source weight
    is copied as stored under any name (moepress's own format stores a novice layer's retained experts as
    `experts.kept.*`); one that equals none is quantised where the source quantised its name class."""
    if value.dim() < 2 or not value.is_floating_point():
        return None
    # moepress's novice layers hold a family's experts module under `kept`: the same class of tensor
    quantised_class = pattern(name.replace(".kept.", ".")) in quantised_classes
    targets = scheme.stored_names(name)
    if scheme.expert_axis is None:
        hit = index.get(_digest(value))
        if hit is not None:
            report.copied += 1
            return dict(zip(targets, (src.get(s) for s in scheme.stored_names(hit[0])), strict=True))
        if not quantised_class:
            return None
        report.quantized.append(name)
        return scheme.quantize(name, value)
    axis = scheme.expert_axis
    hits = [index.get(_digest(part)) for part in value.unbind(axis)]
    if not quantised_class and any(hit is None for hit in hits):
        return None  # not all from the source, and nothing says the format covers this tensor
    parts: list[list[torch.Tensor]] = [[] for _ in targets]
    for part, hit in zip(value.unbind(axis), hits, strict=True):
        if hit is not None:
            report.copied += 1
            pieces = [src.get_part(s, axis, hit[1]) for s in scheme.stored_names(hit[0])]
        else:
            q = scheme.quantize(name, part.unsqueeze(axis))
            pieces = [q[t].select(axis, 0) for t in targets]
        for bucket, piece in zip(parts, pieces, strict=True):
            bucket.append(piece)
    if any(hit is None for hit in hits):
        report.quantized.append(name)
    return {t: torch.stack(bucket, axis).contiguous() for t, bucket in zip(targets, parts, strict=True)}


@contextmanager
def passed_config_quietly() -> Iterator[None]:
    """Inside: no warning that a passed `quantization_config` overrides the checkpoint's loading
    attributes (transformers warns on every such load; dequantising on load is what `load_kwargs` asks)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You passed `quantization_config`", category=UserWarning)
        yield


def load_kwargs(folder: str | Path) -> dict:
    """from_pretrained keyword arguments that dequantise a quantised local checkpoint on load ({} if none)."""
    from moepress.quant import folder_scheme

    scheme = folder_scheme(folder)
    if scheme is None:
        return {}
    try:
        return {"quantization_config": scheme.transformers_config()}
    except ImportError as err:
        raise MoepressError(f"reading {scheme.name} checkpoints needs {err.name}; pip install {err.name}") from None


def stored_bytes(folder: Path) -> int:
    """Bytes of a folder's weight shards on disk, as stored (quantised tensors and their scales)."""
    index = folder / INDEX
    names = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())
