"""vLLM's native format for MoNE novices (`approximate_experts`), read and written by tensor names.

The MoNE reference code's checkpoint format, which vLLM >= 0.33 serves natively
(`vllm/model_executor/layers/fused_moe/expert_substitution.py`): the source `model_type` and
`architectures`, every router row kept, `config.approximate_experts = {"<layer>": [novice ids]}`, the
retained experts stored per expert under their ORIGINAL ids in the source's on-disk layout, and one
`<experts prefix>.<id>.approx_value` vector per novice. Routing is unchanged (no renormalisation): a
token routed to a novice gets its router weight times the vector, which is what `NoviceExperts` computes.

In memory such a layer is the `NoviceExperts` that `apply_structure` builds; what is family-specific
(how the family's fused experts tensors map to per-expert tensors on disk) is taken from transformers'
own save-time conversion (`revert_weight_conversion`), so no family is named here. Loading runs that
conversion on index tensors once per layer and scatters the disk tensors back through it.

This file is copied next to the weights of such a checkpoint (as `moepress_approximate.py`, beside
`moepress_modules.py`) so that `trust_remote_code=True` loads it with torch and transformers only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .compressed import NoviceExperts

APPROX_VALUE_SUFFIX = ".approx_value"
CONFIG_KEY = "approximate_experts"


def integer_parts(key: str) -> list[int]:
    """The integer components of a dotted tensor name (`model.layers.3.mlp.experts.7.w1` -> [3, 7])."""
    return [int(p) for p in key.split(".") if p.isdigit()]


def with_expert_id(key: str, expert: int) -> str:
    """`key` (a per-expert tensor name: layer index, then expert index) with its expert index replaced."""
    parts = key.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    parts[digits[1]] = str(expert)
    return ".".join(parts)


def approx_value_name(expert_key: str, expert: int) -> str:
    """`<experts prefix>.<expert>.approx_value` for any per-expert tensor name of that layer."""
    parts = expert_key.split(".")
    at = [i for i, p in enumerate(parts) if p.isdigit()][1]
    return ".".join([*parts[:at], str(expert)]) + APPROX_VALUE_SUFFIX


def guard_name(expert_key: str, expert: int) -> str:
    """A second copy of one novice vector, outside the experts module (`<block>.moepress_novice_guard.<id>
    .approx_value`): vLLM >= 0.33 reads it as that novice's value again (it parses only the layer index
    and the id), while a vLLM without expert substitution, which silently skips `approx_value` under the
    experts and leaves the novices' experts uninitialised, stops at it ("no module or parameter named")
    instead of serving garbage. One vector per checkpoint."""
    path = approx_value_name(expert_key, expert).removesuffix(APPROX_VALUE_SUFFIX).split(".")
    return ".".join([*path[:-2], GUARD, path[-1]]) + APPROX_VALUE_SUFFIX


GUARD = "moepress_novice_guard"


def novice_layers(structure: dict) -> dict[int, tuple[list[int], list[int]]]:
    """Per layer of `structure` (all `prune` with every router row kept): (retained ids, novice ids)."""
    out = {}
    for idx, spec in structure["layers"].items():
        novices = set(spec["novices"])
        out[int(idx)] = ([e for e in spec["experts"] if e not in novices], sorted(novices))
    return out


def approximate_structure(template: dict, approximate: dict, num_experts: int) -> dict:
    """A `moepress_structure` (names from `template`) rebuilding the layers `approximate` lists."""
    structure = {k: v for k, v in template.items() if k != "layers"}
    structure["layers"] = {
        str(int(i)): {"action": "prune", "experts": list(range(num_experts)), "novices": sorted(map(int, ids))}
        for i, ids in approximate.items()
        if ids
    }
    return structure


def check_approximate(approximate: object, num_experts: int, moe_layers: set[int] | None = None) -> dict:
    """`config.approximate_experts` validated as vLLM validates it, with one-line reasons."""
    if not isinstance(approximate, dict):
        raise ValueError("approximate_experts must map layer indices to lists of expert ids")
    out: dict[int, list[int]] = {}
    for layer, ids in approximate.items():
        if not str(layer).isdigit():
            raise ValueError(f"approximate_experts: layer {layer!r} is not a layer index")
        ids = sorted(int(e) for e in ids or ())
        if len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
            raise ValueError(
                f"approximate_experts of layer {layer} must be distinct expert ids in [0, {num_experts}), got {ids}"
            )
        if len(ids) == num_experts:
            raise ValueError(f"approximate_experts of layer {layer} replaces every expert; at least one must stay")
        if moe_layers is not None and ids and int(layer) not in moe_layers:
            raise ValueError(f"approximate_experts names layer {layer}, which has no MoE block")
        if ids:
            out[int(layer)] = ids
    return out


@contextmanager
def _conversions(model: nn.Module) -> Iterator[None]:
    """Inside: transformers' save-time conversion sees the family's own mapping, rebuilt from the model's
    type. A model loaded from a checkpoint remembers the conversions its load used: none for a
    moepress-format folder, and a quantised one's include the quantiser's steps, which have no reverse."""
    saved = getattr(model, "_weight_conversions", None)
    model._weight_conversions = None  # revert_weight_conversion then rebuilds it from the model's type
    try:
        yield
    finally:
        model._weight_conversions = saved


def revert(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (in-memory names) under the source's on-disk names and layout."""
    from transformers.core_model_loading import revert_weight_conversion

    with _conversions(model):
        return revert_weight_conversion(model, state)


@contextmanager
def kept_view(model: nn.Module, structure: dict) -> Iterator[None]:
    """Inside: each novice layer's `NoviceExperts` replaced by its retained experts (the family's own
    experts class at the retained count), so the model has the source architecture's module names."""
    layers = model.get_submodule(structure["layers_path"])
    swapped = []
    for idx in structure["layers"]:
        mlp = layers[int(idx)].get_submodule(structure["mlp"])
        module = mlp.get_submodule(structure["experts"])
        if isinstance(module, NoviceExperts):
            mlp.set_submodule(structure["experts"], module.kept)
            swapped.append((mlp, module))
    try:
        yield
    finally:
        for mlp, module in swapped:
            mlp.set_submodule(structure["experts"], module)


def _experts_prefix(model: nn.Module, structure: dict, idx: int) -> str:
    return ".".join(p for p in (structure["layers_path"], str(idx), structure["mlp"], structure["experts"]) if p)


def layer_expert_names(model: nn.Module, structure: dict, idx: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per in-memory parameter of novice layer `idx`'s retained experts: {disk name (local ids): flat
    indices}. Each parameter is reverted on its own so the indices name their source unambiguously."""
    prefix = _experts_prefix(model, structure, idx)
    out: dict[str, dict[str, torch.Tensor]] = {}
    with kept_view(model, structure):
        kept = model.get_submodule(prefix)
        shapes = {name: p.shape for name, p in kept.named_parameters()}
        # one parameter at a time fails for conversions that need several sources together; all at once
        # with indices offset per parameter keeps them apart
        offsets, probe, start = {}, {}, 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            probe[f"{prefix}.{name}"] = torch.arange(start, start + n).reshape(shape)
            offsets[name] = (start, start + n)
            start += n
        reverted = revert(model, probe)
    for key, index in reverted.items():
        ints = integer_parts(key)
        if key in probe or len(ints) != 2 or ints[0] != idx:
            raise ValueError(f"layer {idx}'s experts are not stored one tensor per expert on disk ({key})")
        flat = index.reshape(-1)
        first = int(flat[0])
        name = next(n for n, (a, b) in offsets.items() if a <= first < b)
        a, b = offsets[name]
        if int(flat.min()) < a or int(flat.max()) >= b:
            raise ValueError(f"layer {idx}: {key} mixes several parameters; not a per-expert layout")
        out.setdefault(name, {})[key] = flat - a
    return out


def native_state(model: nn.Module, structure: dict) -> dict[str, torch.Tensor]:
    """The tensors of `model` (with `structure`'s novice layers) under the native format's names, in
    the source's on-disk layout: what `save_pretrained(state_dict=..., save_original_format=False)` writes."""
    with kept_view(model, structure):
        state = revert(model, dict(model.state_dict()))
    for idx in novice_layers(structure):
        rename_layer(model, structure, idx, state)
    return state


def native_layer_state(model: nn.Module, structure: dict, idx: int, prefix: str) -> dict[str, torch.Tensor]:
    """Decoder layer `idx`'s tensors (the layer at `prefix`) in the native format: for the streamed
    writer, which has one layer in memory at a time."""
    with kept_view(model, structure):
        layer = model.get_submodule(prefix)
        state = revert(model, {f"{prefix}.{k}": v for k, v in layer.state_dict().items()})
    if str(idx) in structure["layers"]:
        rename_layer(model, structure, idx, state)
    return state


def rename_layer(model: nn.Module, structure: dict, idx: int, state: dict[str, torch.Tensor]) -> None:
    """In `state` (on-disk names, retained experts numbered 0..n-1 as the family's class stores them):
    give novice layer `idx`'s retained experts their original ids and add its `approx_value`s."""
    layers = novice_layers(structure)
    kept, novices = layers[idx]
    local_keys = [key for local in layer_expert_names(model, structure, idx).values() for key in local]
    # every local name popped before any is put back: a retained expert's original id may be another's local one
    renamed = {with_expert_id(key, kept[integer_parts(key)[1]]): state.pop(key) for key in local_keys}
    state.update(renamed)
    values = model.get_submodule(_experts_prefix(model, structure, idx)).novices.detach()
    for row, expert in enumerate(novices):
        state[approx_value_name(local_keys[0], expert)] = values[row].clone()
    if idx == min(layers):  # the one guard copy goes with the first novice layer
        state[guard_name(local_keys[0], novices[0])] = values[0].clone()


def load_native(model: nn.Module, structure: dict, read: Callable[[str], torch.Tensor], available: set[str]) -> None:
    """Fill the retained experts and novice vectors of `model` (built with `structure`, other weights
    already loaded) from a native checkpoint: `read(name)` gives a tensor, `available` its names."""
    by_tail = _by_tail(available)
    for idx, (kept, novices) in novice_layers(structure).items():
        module = model.get_submodule(_experts_prefix(model, structure, idx))
        some_key = None
        with torch.no_grad():
            for name, local in layer_expert_names(model, structure, idx).items():
                param = module.kept.get_parameter(name)
                flat = torch.empty(param.numel(), dtype=param.dtype)
                for key, index in local.items():
                    some_key = key
                    disk = with_expert_id(key, kept[integer_parts(key)[1]])
                    disk = disk if disk in available else by_tail.get(_tail(disk), disk)
                    if disk not in available:
                        raise ValueError(f"the checkpoint has no tensor {disk} (a retained expert of layer {idx})")
                    flat[index] = read(disk).reshape(-1).to(param.dtype)
                param.copy_(flat.reshape(param.shape))
            for row, expert in enumerate(novices):
                name = approx_value_name(some_key, expert)
                name = name if name in available else by_tail.get(_tail(name), name)
                if name not in available:
                    raise ValueError(f"the checkpoint has no {name} (novice {expert} of layer {idx})")
                value = read(name)
                if value.shape != module.novices.shape[1:]:
                    raise ValueError(
                        f"{name} has shape {tuple(value.shape)}, expected {tuple(module.novices.shape[1:])}"
                    )
                module.novices[row].copy_(value.to(module.novices.dtype))


def _tail(name: str) -> str:
    """`name` from the component before its layer index on (`backbone.layers.3.x` -> `layers.3.x`): the
    part a model-level prefix that transformers adds or strips on load (NemotronH's) leaves alone."""
    parts = name.split(".")
    first = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[max(first - 1, 0) :])


def _by_tail(names: set[str]) -> dict[str, str]:
    tails: dict[str, str] = {}
    for n in names:
        if any(p.isdigit() for p in n.split(".")):
            tails[_tail(n)] = n
    return tails


class CheckpointReader:
    """Tensors of a checkpoint folder (local, or a hub id resolved through the hub cache), by name."""

    def __init__(self, path: str | os.PathLike, **hub_kwargs):
        from safetensors import safe_open
        from transformers.utils import cached_file

        path = str(path)

        def resolve(name: str) -> str | None:
            if os.path.isdir(path):
                full = os.path.join(path, name)
                return full if os.path.isfile(full) else None
            return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

        index = resolve("model.safetensors.index.json")
        if index is not None:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        else:
            single = resolve("model.safetensors")
            if single is None:
                raise ValueError(f"{path} has no model.safetensors(.index.json)")
            with safe_open(single, "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        self.weight_map = weight_map
        self._files = {name: resolve(name) for name in set(weight_map.values())}
        self._open = safe_open

    def names(self) -> set[str]:
        return set(self.weight_map)

    def __call__(self, name: str) -> torch.Tensor:
        with self._open(self._files[self.weight_map[name]], "pt") as f:
            return f.get_tensor(name)


def num_experts(config, key: str) -> int:
    """The routed-expert count of `config` under `key` (dotted for a sub-config)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in key.split("."):
        config = getattr(config, name)
    return int(config)


def prepare_config(config, template: dict) -> dict | None:
    """Give `config` (of a native-format checkpoint) the `moepress_structure` that builds its novice
    layers, and return it; None for a config without `approximate_experts`."""
    raw = getattr(config, CONFIG_KEY, None)
    if not raw:
        return None
    count = num_experts(config, template["num_experts_key"])
    structure = approximate_structure(template, check_approximate(raw, count), count)
    config.moepress_structure = structure
    return structure


def fill_native(model: nn.Module, path: str | os.PathLike, **hub_kwargs) -> None:
    """After `from_pretrained` built `model` with its novice layers: load their retained experts and
    novice vectors from the checkpoint at `path` (no-op for a model without novice layers)."""
    structure = getattr(model.config, "moepress_structure", None)
    if not structure or not structure["layers"]:
        return
    reader = CheckpointReader(path, **hub_kwargs)
    check_files(structure, reader.names())
    load_native(model, structure, reader, reader.names())


# what transformers reports missing (built empty, filled by `fill_native`) or unexpected (read by it)
IGNORED_MISSING = [r"\.novices$", r"\.kept\."]
# (transformers stacks the retained experts' tensors into the fused name the family's class would have)
IGNORED_UNEXPECTED = [r"\.approx_value$", r"\.experts\.[^.]+$"]


def check_files(structure: dict, names: set[str]) -> None:
    """Before any weight loads: every novice of `structure` has its `approx_value` among `names`, and no
    `approx_value` belongs to an expert the config does not list (ValueError with one line)."""
    present = {tuple(integer_parts(n)) for n in names if n.endswith(APPROX_VALUE_SUFFIX)}
    wanted = {(idx, e) for idx, (_, novices) in novice_layers(structure).items() for e in novices}
    missing = sorted(wanted - present)
    if missing:
        layer, expert = missing[0]
        raise ValueError(
            f"the checkpoint has no approx_value for {len(missing)} novice expert(s) its config lists in "
            f"approximate_experts (first: expert {expert} of layer {layer})"
        )
    extra = sorted(present - wanted)
    if extra:
        layer, expert = extra[0]
        raise ValueError(
            f"the checkpoint has an approx_value for expert {expert} of layer {layer}, "
            "which approximate_experts does not list"
        )
