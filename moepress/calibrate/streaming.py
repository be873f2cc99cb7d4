"""Streaming execution for models larger than the accelerator (or host) memory.

The model is built as a skeleton on the meta device; each decoder layer's tensors are read lazily
from the safetensors shards only when that layer runs, moved to the compute device, used, and
dropped back to meta, while a background thread already reads the next layer from disk. Under
torch.distributed the ranks split each layer's reads and broadcast the tensors. Peak accelerator
memory ≈ one layer's weights + the calibration activations; peak host memory ≈ two layers + the
activation cache.

Checkpoints store experts either as transformers v5 fused tensors or, as published checkpoints and
`save_pretrained` do, one tensor per expert (`experts.{e}.gate_proj.weight`, ...); the per-expert
form is stacked on the fly (names per family from the adapter, or from the per-expert layouts that
transformers' weight-conversion mapping stacks on load: `block_sparse_moe.experts.{e}.w1`, ...).
Other value conversions (split QKV, reshaped convolutions) are not replayed: such a checkpoint stops
with one line naming the tensor it lacks.

Non-persistent buffers (rotary tables per layer type, embedding scales, ...) are in no checkpoint: the
skeleton is built with real buffers and meta parameters, so the model's own constructors and weight
init compute every buffer as for an in-memory model; those values are kept aside (`Skeleton.buffers`)
and copied into every module materialised, for non-persistent buffers and for buffers a checkpoint
lacks (as `from_pretrained` initialises missing keys). A family whose non-persistent buffers derive
from its weights is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
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
        from moepress.quant import folder_scheme

        # a quantised checkpoint (FP8, MXFP4, ...): its weights are read dequantised, one at a time
        self.scheme = folder_scheme(self.folder)
        self.quantized = self.scheme.logical_names(weight_map) if self.scheme is not None else {}
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        # the model whose transformers weight conversions rename checkpoint keys (set by `Streamer`)
        self.model: nn.Module | None = None

    def _file(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(safe_open(self.folder / shard, "pt"))
        return self._handles[shard]

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map or key in self.quantized

    def get(self, key: str) -> torch.Tensor:
        if key in self.quantized:
            stored = {name: self._file(self.weight_map[name]).get_tensor(name) for name in self.quantized[key]}
            return self.scheme.dequantize(key, stored, torch.float32)
        return self._file(self.weight_map[key]).get_tensor(key)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def aliases(self, name: str, adapter: Adapter) -> list[str]:
        """The names the checkpoint may hold model tensor `name` under: its own, the adapter's older
        layouts, and the name transformers' conversion renames it to (as `from_pretrained` reads it)."""
        names = [name, *adapter.legacy_aliases(name)]
        if name not in self and self.model is not None:
            from transformers.modeling_utils import revert_weight_conversion

            probe = torch.empty(0, device="meta")
            try:
                out = revert_weight_conversion(self.model, {name: probe})
            except Exception:  # noqa: BLE001 - a conversion that transforms values: not a plain rename
                out = {}
            names += [k for k, v in out.items() if v is probe and k != name]  # the value passed unchanged
        return names

    def _expert_layouts(self) -> tuple[list[tuple[str, list[str], int | None]], list[tuple[str, str]]]:
        """transformers' per-expert checkpoint layouts for this model, from its weight-conversion mapping:
        ([(fused target suffix, per-expert source patterns, concatenation dim or None)], [(checkpoint
        name part, model name part)] renamings). Only the conversions that stack one tensor per expert
        (and concatenate gate with up) are read; any other conversion is not streamed."""
        if getattr(self, "_layouts", None) is None:
            self._layouts = _expert_layouts(self.model)
        return self._layouts

    def _converted_experts(self, name: str) -> torch.Tensor | None:
        """Fused experts tensor `name` stacked from the per-expert tensors transformers' conversion reads
        (MiniMax's `block_sparse_moe.experts.{e}.w1`, NemotronH's `backbone.` prefix, ...), or None."""
        if self.model is None:
            return None
        layouts, renames = self._expert_layouts()
        for target, sources, dim in layouts:
            if not name.endswith(target):
                continue
            prefix = name[: len(name) - len(target)]
            for rename in (False, True):
                def key(source: str, e: int, rename: bool = rename, prefix: str = prefix) -> str:
                    full = prefix + source.replace("*", str(e))
                    for checkpoint_part, model_part in renames if rename else ():
                        full = full.replace(model_part, checkpoint_part)
                    return full

                per_source: list[list[torch.Tensor]] = [[] for _ in sources]
                e = 0
                while all(key(src, e) in self for src in sources):
                    for parts, src in zip(per_source, sources, strict=True):
                        parts.append(self.get(key(src, e)))
                    e += 1
                if e:
                    stacked = [torch.stack(parts) for parts in per_source]
                    return stacked[0] if dim is None else torch.cat(stacked, dim=dim)
        return None

    def tensor_for(self, name: str, adapter: Adapter) -> torch.Tensor:
        """The checkpoint tensor for model parameter/buffer `name`, stacking per-expert tensors."""
        names = adapter.legacy_expert_names
        for alias in self.aliases(name, adapter):
            if alias in self:
                return self.get(alias)
            for suffix, parts in (("experts.gate_up_proj", ("gate", "up")), ("experts.down_proj", ("down",))):
                if not alias.endswith(suffix):
                    continue
                prefix = alias[: -len(suffix)] + "experts."
                experts, e = [], 0
                while all(f"{prefix}{e}.{names[p]}.weight" in self for p in parts):
                    experts.append(torch.cat([self.get(f"{prefix}{e}.{names[p]}.weight") for p in parts], 0))
                    e += 1
                if experts:
                    return torch.stack(experts)
        stacked = self._converted_experts(name)
        if stacked is not None:
            return stacked
        raise MoepressError(
            f"checkpoint {self.folder} has no tensor for {name}: either it is incomplete, or (when "
            "`from_pretrained` loads it) the family stores its weights in another layout that transformers "
            "converts on load, which --stream does not: run without --stream")


def _plain(pattern: str) -> bool:
    """A conversion pattern that is a literal name part (at most a `*` for the expert index)."""
    return bool(pattern) and all(c.isalnum() or c in "._*" for c in pattern)


def _expert_layouts(model: nn.Module | None) -> tuple[list[tuple[str, list[str], int | None]], list[tuple[str, str]]]:
    """See `LazyCheckpoint._expert_layouts`."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming
    except ImportError:  # a transformers without weight conversions: nothing to read
        return [], []
    try:
        mapping = get_model_conversion_mapping(model) if model is not None else []
    except Exception:  # noqa: BLE001 - no mapping for this model: its checkpoint names are its own
        return [], []
    layouts, renames = [], []
    for t in mapping:
        sources, targets = list(t.source_patterns), list(t.target_patterns)
        if type(t) is WeightRenaming and len(sources) == len(targets) == 1 and _plain(sources[0]) \
                and _plain(targets[0]) and "*" not in sources[0] + targets[0]:
            renames.append((sources[0], targets[0]))
        if not isinstance(t, WeightConverter) or len(targets) != 1 or not _plain(targets[0]):
            continue
        ops = list(t.operations)
        kinds = [type(o) for o in ops]
        if kinds not in ([MergeModulelist], [MergeModulelist, Concatenate]) or ops[0].dim != 0:
            continue
        if all(_plain(src) and src.count("*") == 1 for src in sources):
            layouts.append((targets[0], sources, ops[1].dim if len(ops) > 1 else None))
    return layouts, renames


@dataclass
class Skeleton:
    """A meta-device model, its adapter, and its buffers as its own init computes them (on the host, by
    full name): `materialize` copies them in where no checkpoint holds them (non-persistent buffers)."""

    model: nn.Module
    adapter: Adapter
    buffers: dict[str, torch.Tensor]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside register their parameters on the meta device (no memory) while their
    buffers stay real, computed by the constructors (and the weight init run on them) as usual."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and not p.is_meta:
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(folder: str | Path, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False) -> Skeleton:
    """The model with every tensor on the meta device, its adapter, and its buffers' initial values.

    Built with real buffers so that, as in an in-memory model, the constructors and the model's
    weight init (which transformers runs for buffers a checkpoint does not hold) compute them; the
    parameters, never touched by that init on the meta device, cost nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model)
    buffers = {}
    for name, buf in model.named_buffers():
        if not buf.is_meta:
            buffers[name] = buf.detach().to("cpu")  # the model lets go of it below (to meta)
        elif _non_persistent(model, name):
            raise MoepressError(f"{adapter.family}: streamed loading cannot compute the non-persistent buffer "
                                f"`{name}` (it derives from the weights); run without --stream")
    return Skeleton(model.to("meta").eval(), adapter, buffers)


def build_skeleton(folder: str | Path, dtype: torch.dtype = torch.bfloat16, trust_remote_code: bool = False):
    """The model with every parameter on the meta device (no memory), plus its adapter."""
    built = skeleton(folder, dtype, trust_remote_code)
    return built.model, built.adapter


def _non_persistent(module: nn.Module, name: str) -> bool:
    """Whether `name` (under `module`) is a buffer that `state_dict` leaves out."""
    owner, _, leaf = name.rpartition(".")
    return leaf in module.get_submodule(owner)._non_persistent_buffers_set


def materialize(module: nn.Module, prefix: str, ckpt: LazyCheckpoint, adapter: Adapter, device, dtype,
                tensors: dict[str, torch.Tensor] | None = None,
                buffers: dict[str, torch.Tensor] | None = None, recurse: bool = True) -> None:
    """Give `module` (named `prefix` in the model) real tensors from the checkpoint on `device`; its
    non-persistent buffers, and buffers the checkpoint lacks, from `buffers` (`Skeleton.buffers`).

    `tensors` (from `read_tensors`) are used instead of reading the shards. Under torch.distributed
    with `tensors` given, each tensor is read by one rank only and broadcast to the others, so G
    ranks read a layer from disk once between them instead of G times. `recurse=False`: only the
    module's own tensors, not its children's.
    """
    module.to_empty(device=device, recurse=recurse)
    buffers = buffers or {}
    shared = tensors is not None and _distributed()
    with torch.no_grad():
        for k, (name, p) in enumerate(_named_tensors(module, recurse)):
            full = f"{prefix}.{name}" if prefix else name
            initial = buffers.get(full) if not isinstance(p, nn.Parameter) else None
            if initial is not None and _non_persistent(module, name):  # every rank has it: no read, no broadcast
                p.copy_(initial)
                continue
            if tensors is not None:
                t = tensors.get(full)
                if shared:
                    import torch.distributed as dist

                    owner = k % dist.get_world_size()
                    if not _persistent(full, ckpt, adapter, p):
                        p.copy_(_unstored(full, initial))
                        continue
                    if t is not None:
                        p.copy_(t.to(dtype=p.dtype if p.is_floating_point() else t.dtype), non_blocking=True)
                    dist.broadcast(p.data, src=owner)
                    continue
                if t is None:  # a buffer the checkpoint lacks (read_tensors checked the parameters)
                    t = _unstored(full, initial)
            else:
                try:
                    t = ckpt.tensor_for(full, adapter)
                except MoepressError:
                    if isinstance(p, nn.Parameter):
                        raise
                    t = _unstored(full, initial)
            p.copy_(t.to(dtype=p.dtype if p.is_floating_point() else t.dtype))


def _unstored(full: str, initial: torch.Tensor | None) -> torch.Tensor:
    """A buffer's value where the checkpoint lacks it: its initial value, as `from_pretrained` gives."""
    if initial is None:
        raise MoepressError(f"neither the checkpoint nor the model's init gives buffer {full}; run without --stream")
    return initial


def _named_tensors(module: nn.Module, recurse: bool = True) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(recurse=recurse)) + list(module.named_buffers(recurse=recurse))


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _persistent(full: str, ckpt: LazyCheckpoint, adapter: Adapter, p: torch.Tensor) -> bool:
    """Whether the checkpoint holds this tensor (non-persistent buffers are rebuilt, not stored)."""
    if isinstance(p, nn.Parameter):
        return True
    try:
        return any(a in ckpt for a in ckpt.aliases(full, adapter))
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
        built = skeleton(folder, dtype, trust_remote_code)
        self.model, self.adapter, self.buffers = built.model, built.adapter, built.buffers
        self.ckpt = LazyCheckpoint(folder)
        self.ckpt.model = self.model
        self.layers = self.adapter.layers(self.model)
        self.prefixes = _layer_names(self.model, self.layers)
        in_layers = tuple(f"{p}." for p in self.prefixes)
        # a head tied to the embeddings is in no checkpoint: tie_weights below shares the loaded one
        tied = set(getattr(self.model, "all_tied_weights_keys", None) or ()) - set(self.ckpt.weight_map)
        # Everything but the decoder layers (embeddings, final norm, head, rotary) is small: load it, module
        # by module, each one's own tensors (a module holding children may hold tensors too)
        for name, child in self.model.named_modules():
            if name.startswith(in_layers) or not _named_tensors(child, recurse=False):
                continue
            own = [f"{name}.{n}" if name else n for n, _ in child.named_parameters(recurse=False)]
            if not (own and set(own) <= tied):
                materialize(child, name, self.ckpt, self.adapter, self.rest_device, dtype, buffers=self.buffers,
                            recurse=False)
        if tied or getattr(self.model.config, "tie_word_embeddings", False):
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
                    tensors=tensors, buffers=self.buffers)
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
