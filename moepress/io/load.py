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

    attrs = {"__init__": __init__, "__module__": __name__, "config_class": config_class}
    return type(compressed_class_name(base.__name__), (base,), attrs)


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
    return "AutoModelForCausalLM" in config.get("auto_map", {})


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
    structure = raw.get("moepress_structure")
    if structure is None:
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
