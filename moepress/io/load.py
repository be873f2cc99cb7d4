"""Load a checkpoint written by moepress, without running code from the checkpoint folder.

A checkpoint the source architecture expresses is a plain Hugging Face folder. Any other carries
`config.moepress_structure` under its own model_type (`moepress_deepseek_v2`); `transformers` can load
it through the folder's `modeling_moepress.py` (`trust_remote_code=True`), and this module does the
same with the installed moepress instead: it subclasses the family's config (under that model_type)
and model class, whose `__init__` rebuilds the changed layers before the weights load. Only a
checkpoint made from a remote-code model (DeepSeekMoE-16B) needs `trust_remote_code`, because its base
architecture itself is code in the folder.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.modules.compressed import apply_structure, register_weight_conversions
from moepress.modules.model_type import compressed_class_name, source_model_type


@functools.cache
def compressed_config_class(base: type, model_type: str) -> type:
    """`base` (a family's config class) under a compressed checkpoint's own `model_type`; `base` itself
    for a checkpoint written before outputs had their own model_type."""
    if model_type == base.model_type:
        return base
    name = compressed_class_name(base.__name__)
    return type(name, (base,), {"model_type": model_type, "__module__": __name__})


@functools.cache
def compressed_class(base: type, config_class: type) -> type:
    """`base` (a family's ForCausalLM class) whose `__init__` also applies `config.moepress_structure`."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_structure(self, config.moepress_structure)

    attrs = {"__init__": __init__, "__module__": __name__, "config_class": config_class,
             "_can_set_experts_implementation": _experts_implementation_of(base)}
    return type(compressed_class_name(base.__name__), (base,), attrs)


def _experts_implementation_of(base: type) -> classmethod:
    """transformers lets a class pick its experts kernel (grouped_mm, ...) only if the source file of the
    class's module uses `@use_experts_implementation`; a class built here lives in this module, so it asks
    the family's class (else it falls back to the eager loop, which some families' novice routing breaks)."""
    return classmethod(lambda cls: base._can_set_experts_implementation())


@functools.cache
def native_class(base: type) -> type:
    """`base` whose `__init__` also builds the novice layers of a native-format (`approximate_experts`)
    checkpoint; transformers is told the retained experts and novices are filled after it loads."""
    from moepress.modules.approximate import IGNORED_MISSING, IGNORED_UNEXPECTED

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_structure(self, config.moepress_structure)

    attrs = {
        "__init__": __init__,
        # the family's own weight renames apply (transformers skips them for custom classes)
        "is_custom_code": classmethod(lambda cls: False),
        "__module__": __name__,
        "_can_set_experts_implementation": _experts_implementation_of(base),
        "_keys_to_ignore_on_load_missing": IGNORED_MISSING,
        "_keys_to_ignore_on_load_unexpected": IGNORED_UNEXPECTED,
    }
    return type(compressed_class_name(base.__name__), (base,), attrs)


class _NovicePlan:
    """Just enough of a CompressionPlan for `describe`: every listed layer keeps its router rows."""

    def __init__(self, layers: dict[int, list[int]], num_experts: int):
        from moepress.plan import Prune

        self.actions = {
            i: Prune(keep_experts=[e for e in range(num_experts) if e not in ids], novices=ids)
            for i, ids in layers.items()
        }

    def action(self, i: int):
        return self.actions[i]


def native_template(config, layers: list[int]) -> dict:
    """Where the family keeps its router and experts (a `moepress_structure` without layers), found
    by moepress's adapter on a weightless model of `config`; works for any native-format checkpoint,
    the MoNE reference's included."""
    from transformers import AutoModelForCausalLM

    from moepress.models.base import get_adapter
    from moepress.modules.approximate import num_experts
    from moepress.surgery.apply import describe

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    adapter = get_adapter(skeleton)
    moe = set(adapter.moe_layer_ids(skeleton))
    outside = sorted(set(layers) - moe)
    if outside:
        raise MoepressError(f"approximate_experts names layer {outside[0]}, which has no MoE block in this model")
    decoder = adapter.layers(skeleton)
    blocks = {i: adapter.block(i, decoder[i]) for i in layers}
    count = num_experts(config, adapter.num_experts_key)
    structure = describe(skeleton, _NovicePlan({i: [0] for i in layers}, count), adapter, blocks)
    return {k: v for k, v in structure.items() if k != "layers"}


def load_native(folder: Path, kwargs: dict) -> nn.Module:
    """A checkpoint in vLLM's native MoNE format, checked (config against its tensors) before any
    weight loads."""
    from transformers import AutoConfig

    from moepress.modules import approximate

    config = AutoConfig.from_pretrained(folder)
    raw = getattr(config, approximate.CONFIG_KEY)
    try:
        # names that are no layer index are refused, with the rest, by prepare_config's check
        layers = [int(i) for i, ids in raw.items() if ids and str(i).isdigit()] if isinstance(raw, dict) else []
        structure = approximate.prepare_config(config, native_template(config, layers))
        reader = approximate.CheckpointReader(folder)
        approximate.check_files(structure, reader.names())
    except ValueError as e:
        raise MoepressError(f"{folder}: {e}") from None
    base = resolve_base_class(structure, folder)
    model = native_class(base).from_pretrained(folder, config=config, **kwargs)
    approximate.load_native(model, structure, *_dequantizing(reader, folder))
    return model


def _dequantizing(read, folder: Path):
    """(`read` (stored tensors by name) giving quantised weights (an FP8 or int4 output's retained experts)
    dequantised with their scales, every name it answers: the stored ones and the quantised weights')."""
    from moepress.quant import folder_scheme

    scheme = folder_scheme(folder)
    if scheme is None:
        return read, read.names()
    quantized = scheme.logical_names(read.names())

    def dequantized(name: str) -> torch.Tensor:
        if name not in quantized:
            return read(name)
        return scheme.dequantize(name, {s: read(s) for s in quantized[name]}, torch.float32)

    return dequantized, read.names() | set(quantized)


def resolve_base_class(structure: dict, folder: Path) -> type:
    """The class named by `structure['base']`: from transformers, or from the folder's own code."""
    module, name = structure["base"]["module"], structure["base"]["class"]
    if module.startswith("."):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(f"{module[1:]}.{name}", str(folder))
    import importlib

    return getattr(importlib.import_module(module), name)


def is_remote_code(config: dict) -> bool:
    """Whether the checkpoint's base architecture is code shipped in the folder."""
    structure = config.get("moepress_structure")
    if structure is not None:
        return structure["base"]["module"].startswith(".")
    auto = config.get("auto_map", {}).get("AutoModelForCausalLM", "")
    if config.get("approximate_experts") and auto.startswith("modeling_moepress."):
        return False  # moepress's own loader for the native novice format, over transformers' own class
    return bool(auto)


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """The model in `path` (a folder written by moepress, or any plain checkpoint), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MoepressError(f"{folder} has no config.json; pass a folder written by `moepress apply`")
    raw = json.loads((folder / "config.json").read_text())
    remote = is_remote_code(raw)
    if remote and not trust_remote_code:
        raise MoepressError(
            f"{folder} was compressed from a remote-code model whose architecture is code in the folder; "
            "pass trust_remote_code=True if you trust it"
        )
    if isinstance(raw.get("model_type"), str) and not remote:
        from moepress.models.families import check_model_type

        check_model_type(raw["model_type"])  # compressed from a family of a later transformers
    kwargs = {} if dtype is None else {"dtype": dtype}
    from moepress.quant.requantize import load_kwargs, passed_config_quietly

    kwargs.update(load_kwargs(folder))  # an output kept in its input's FP8 / MXFP4 format: dequantised
    structure = raw.get("moepress_structure")
    with passed_config_quietly():
        if raw.get("approximate_experts") and structure is None and not remote:
            model = load_native(folder, kwargs)
        elif structure is None:
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, **kwargs)
        else:
            base = resolve_base_class(structure, folder)
            model_type = raw.get("model_type", base.config_class.model_type)
            config_class = compressed_config_class(base.config_class, model_type)
            if not remote:
                register_weight_conversions(model_type, source_model_type(model_type))
            config = config_class.from_pretrained(folder)
            model = compressed_class(base, config_class).from_pretrained(folder, config=config, **kwargs)
    return model.to(device).eval()
