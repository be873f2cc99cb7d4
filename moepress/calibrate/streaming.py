"""Streaming execution for models larger than the accelerator (or host) memory.

The model is built as a skeleton on the meta device; each decoder layer's tensors are read lazily
from the safetensors shards only when that layer runs, moved to the compute device, used, and
dropped back to meta, while a background thread already reads the next layer from disk. Under
torch.distributed the ranks split each layer's reads and broadcast the tensors. Peak accelerator
memory ≈ one layer's weights + the calibration activations; peak host memory ≈ two layers + the
activation cache.

Checkpoints store experts either as transformers v5 fused tensors or, as published checkpoints and
`save_pretrained` do, one tensor per expert (`experts.{e}.gate_proj.weight`, ...); the per-expert
form is stacked on the fly (names per family from the adapter).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from moepress.errors import MoepressError
from moepress.models import get_adapter
from moepress.models.base import Adapter


class LazyCheckpoint:
    """Tensor lookup across safetensors shards, reading only the tensors asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            weight_map = {}
            for shard in sorted(self.folder.glob("*.safetensors")):
                with safe_open(shard, "pt") as f:
                    weight_map.update({k: shard.name for k in f.keys()})
        if not weight_map:
            raise MoepressError(
                f"{self.folder} holds no safetensors weights; streaming reads safetensors only: convert the "
                "checkpoint (load it and save_pretrained) or run without --stream"
            )
        self.weight_map = weight_map
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}

    def _file(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(safe_open(self.folder / shard, "pt"))
        return self._handles[shard]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        return self._file(self.weight_map[key]).get_tensor(key)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def tensor_for(self, name: str, adapter: Adapter) -> torch.Tensor:
        """The checkpoint tensor for model parameter/buffer `name`, stacking per-expert tensors."""
        names = adapter.legacy_expert_names
        for alias in (name, *adapter.legacy_aliases(name)):
            if alias in self:
                return self.get(alias)
            for suffix, parts in (("experts.gate_up_proj", ("gate", "up")), ("experts.down_proj", ("down",))):
                if not alias.endswith(suffix):
                    continue
                prefix = alias[: -len(suffix)] + "experts."
                experts, e = [], 0
                while f"{prefix}{e}.{names['gate']}.weight" in self:
                    experts.append(torch.cat([self.get(f"{prefix}{e}.{names[p]}.weight") for p in parts], 0))
                    e += 1
                if experts:
                    return torch.stack(experts)
        raise MoepressError(f"checkpoint {self.folder} has no tensor for {name}; it is incomplete")


def build_skeleton(folder: str | Path, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (no memory), plus its adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), get_adapter(model)


def materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, adapter: Adapter, device, dtype,
                tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Give `module` (named `prefix` in the model) real tensors from the checkpoint on `device`.

    `tensors` (from `read_tensors`) are used instead of reading the shards. Under torch.distributed
    with `tensors` given, each tensor is read by one rank only and broadcast to the others, so G
    ranks read a layer from disk once between them instead of G times.
    """
    module.to_empty(device=device)
    shared = tensors is not None and _distributed()
    with torch.no_grad():
        for k, (name, p) in enumerate(_named_tensors(module)):
            full = f"{prefix}.{name}" if prefix else name
            if tensors is not None:
                t = tensors.get(full)
                if shared:
                    import torch.distributed as dist

                    owner = k % dist.get_world_size()
                    if not _persistent(full, ckpt, adapter, p):
                        continue
                    if t is not None:
                        p.copy_(t.to(dtype=p.dtype if p.is_floating_point() else t.dtype), non_blocking=True)
                    dist.broadcast(p.data, src=owner)
                    continue
                if t is None:
                    continue  # non-persistent buffer (read_tensors checked the parameters)
            else:
                try:
                    t = ckpt.tensor_for(full, adapter)
                except MoepressError:
                    if isinstance(p, nn.Parameter):
                        raise
                    continue  # non-persistent buffers (rotary tables) are recomputed below
            p.copy_(t.to(dtype=p.dtype if p.is_floating_point() else t.dtype))
    _reset_rotary(module, device)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _persistent(full: str, ckpt: LazyCheckpoint, adapter: Adapter, p: torch.Tensor) -> bool:
    """Whether the checkpoint holds this tensor (non-persistent buffers are rebuilt, not stored)."""
    if isinstance(p, nn.Parameter):
        return True
    try:
        return any(a in ckpt for a in (full, *adapter.legacy_aliases(full)))
    except MoepressError:
        return False


def read_tensors(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, adapter: Adapter,
                 pin: bool = False) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `module` read into host memory (this rank's share when distributed).

    This is the slow, disk-bound half of loading a layer; `Streamer` runs it in a background thread
    for the next layer while the current one computes.
    """
    rank, size = 0, 1
    if _distributed():
        import torch.distributed as dist

        rank, size = dist.get_rank(), dist.get_world_size()
    out: dict[str, torch.Tensor] = {}
    for k, (name, p) in enumerate(_named_tensors(module)):
        if k % size != rank:
            continue
        full = f"{prefix}.{name}" if prefix else name
        try:
            t = ckpt.tensor_for(full, adapter)
        except MoepressError:
            if isinstance(p, nn.Parameter):
                raise
            continue
        out[full] = t.pin_memory() if pin else t
    return out


def _reset_rotary(module: nn.Module, device) -> None:
    """Rotary embeddings keep non-persistent `inv_freq` tables computed at init; rebuild them."""
    for m in module.modules():
        if hasattr(m, "inv_freq") and hasattr(m, "config"):
            fresh = type(m)(m.config)
            for name, buf in fresh.named_buffers(recurse=False):
                setattr(m, name, buf.to(device))
            m.attention_scaling = getattr(fresh, "attention_scaling", 1.0)


def release(module: nn.Module) -> None:
    """Drop a module's tensors back to the meta device, freeing its memory."""
    module.to("meta")


class Streamer:
    """A meta-device model whose decoder layers are read from the shards one at a time."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                 rest_device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        # Embeddings and head can be as large as a layer; calibration needs the embeddings once, on
        # the host, so they stay there and the accelerator holds only the running layer.
        self.rest_device = torch.device(rest_device)
        self.dtype = dtype
        self.model, self.adapter = build_skeleton(folder, dtype, trust_remote_code)
        self.ckpt = LazyCheckpoint(folder)
        self.layers = self.adapter.layers(self.model)
        self.prefixes = _layer_names(self.model, self.layers)
        in_layers = tuple(f"{p}." for p in self.prefixes)
        # Everything but the decoder layers (embeddings, final norm, head, rotary) is small: load it.
        for name, child in self.model.named_modules():
            if name and not list(child.children()) and not name.startswith(in_layers):
                materialize(child, name, self.ckpt, self.adapter, self.rest_device, dtype)
        if getattr(self.model.config, "tie_word_embeddings", False):
            self.model.tie_weights()
        # one reader thread: disk reads of layer i+1 overlap the compute of layer i
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepress-prefetch")
        self._prefetched: dict[int, Future] = {}
        self.read_wait_s = 0.0

    def load_layer(self, i: int) -> nn.Module:
        """Layer i on the device; the next layer's tensors start reading from disk in the background."""
        pending = self._prefetched.pop(i, None)
        t0 = time.perf_counter()
        tensors = pending.result() if pending is not None else self._read(i)
        self.read_wait_s += time.perf_counter() - t0  # time compute stood still waiting for the disk
        for stale in self._prefetched.values():
            stale.cancel()
        self._prefetched.clear()
        if i + 1 < len(self.layers):
            self._prefetched[i + 1] = self._pool.submit(self._read, i + 1)
        materialize(self.layers[i], self.prefixes[i], self.ckpt, self.adapter, self.device, self.dtype,
                    tensors=tensors)
        return self.layers[i]

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        return read_tensors(self.layers[i], self.prefixes[i], self.ckpt, self.adapter,
                            pin=self.device.type == "cuda")

    def release_layer(self, i: int) -> None:
        release(self.layers[i])

    def close(self) -> None:
        for f in self._prefetched.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        self.ckpt.close()


def calibrate_streaming(folder: str | Path, input_ids: torch.Tensor, device="cpu", dtype=torch.float32,
                        trust_remote_code: bool = False, **kwargs):
    """`runner.calibrate` without ever holding the whole model: layers stream from the shards."""
    from moepress.calibrate.runner import calibrate

    streamer = Streamer(folder, device, dtype, trust_remote_code)
    try:
        return calibrate(streamer.model, input_ids, device=streamer.device, stream=streamer, **kwargs)
    finally:
        streamer.close()


def _layer_names(model: nn.Module, layers: nn.ModuleList) -> list[str]:
    for name, child in model.named_modules():
        if child is layers:
            return [f"{name}.{i}" for i in range(len(layers))]
    raise RuntimeError("decoder layers not found")
