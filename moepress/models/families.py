"""Which model types of the installed transformers are Mixture-of-Experts decoders, derived from the
library itself: a causal-LM model type whose modeling file defines a routed-experts class.

tests/test_adapters.py compares this list with the families moepress has adapters for, so a
transformers release that adds an MoE family fails the suite by that family's name.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache

# transformers names its routed-experts classes `<Family>Experts` (fused, `use_experts_implementation`),
# `<Family>ExpertGLU` (DBRX) or `<Family>ParallelExperts` (JetMoE); shared experts are not routed
_EXPERTS_CLASS = re.compile(r"(Experts|ExpertGLU)$")


@cache
def transformers_moe_model_types() -> dict[str, str]:
    """model_type -> causal-LM class name, for every causal LM of the installed transformers whose
    modeling module defines a routed-experts class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = importlib.import_module(getattr(transformers, class_name).__module__)
        except Exception:  # noqa: BLE001 - a model whose optional dependency is missing cannot be loaded anyway
            continue
        prefix = re.sub(r"For\w+$", "", class_name)
        if any(
            inspect.isclass(obj)
            and obj.__module__ == module.__name__
            and _EXPERTS_CLASS.search(name)
            and (not name.endswith("SharedExperts") or name == prefix + "Experts")
            for name, obj in vars(module).items()
        ):
            found[model_type] = class_name
    return found


# model_type -> the transformers release the family's classes came in (`Family.since`), for each declared
# family the installed release is older than (filled by `moepress.models.declared.declare`, which registers
# no adapter for them)
NEEDS_NEWER_TRANSFORMERS: dict[str, str] = {}


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: `5.24.0.dev0` has the families of 5.24."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def transformers_release() -> tuple[int, int]:
    import transformers

    return release(transformers.__version__)


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers has a config class (and so the model classes) for `model_type`."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def needs_newer_transformers(model_type: str) -> str | None:
    """The one-line reason `model_type` (or the source family of a `moepress_<family>` output) cannot be
    used with the installed transformers because its family came in a later release; None if it can."""
    from moepress.models.base import _load_all
    from moepress.modules.model_type import source_model_type

    _load_all()
    source = source_model_type(model_type)
    since = NEEDS_NEWER_TRANSFORMERS.get(source)
    if since is None:
        return None
    import transformers

    return (
        f"model type {source!r} needs transformers >= {since} (installed: {transformers.__version__}); "
        "pip install -U transformers"
    )


def check_model_type(model_type: str) -> None:
    """Raise `MoepressError` with `needs_newer_transformers`' line, if it has one."""
    from moepress.errors import MoepressError

    reason = needs_newer_transformers(model_type)
    if reason:
        raise MoepressError(reason)


def is_transformers_moe(model_type: str) -> bool:
    """Whether `model_type` is an MoE family of the installed transformers (cheap for known types)."""
    return model_type in transformers_moe_model_types()


# MoE model types of transformers that moepress has no adapter for yet, with the reason (shown to users).
NO_ADAPTER_YET: dict[str, str] = {
}


def supported_model_types() -> set[str]:
    """Every model_type some registered adapter accepts."""
    from moepress.models.base import _REGISTRY, _load_all

    _load_all()
    return {t for adapter in _REGISTRY for t in adapter.model_types}


def routing_description(block) -> str:
    """A block's routing in a few words, read off the live block (not restated by hand)."""
    r = block.routing
    parts = [f"{r.scoring} top-k"]
    if r.norm_topk:
        parts.append("renormalised")
    if r.scaling != 1.0:
        parts.append(f"scaled ×{r.scaling:g}")
    if r.n_group and r.n_group > 1:
        parts.append("group-limited")
    if block.correction_bias is not None:
        parts.append("choice bias")
    if block.router_bias is not None:
        parts.append("router bias")
    if type(block).__name__ != "MoEBlock":
        parts.append(f"own block ({type(block).__name__})")
    return ", ".join(parts)


def families_table() -> list[dict[str, str]]:
    """One row per registered family, read from a tiny random model of it (moepress.testing): model
    types, where the MoE block lives, shared experts, routing and the condensed form."""
    from moepress.models.base import _REGISTRY, _load_all
    from moepress.testing import tiny_model

    _load_all()
    rows = []
    for adapter in _REGISTRY:
        model_type = adapter.model_types[0]
        if model_type not in transformers_moe_model_types():  # remote code: no class in transformers
            continue
        model = tiny_model(model_type)
        layers = adapter.layers(model)
        i = adapter.moe_layer_ids(model)[0]
        block = adapter.block(i, layers[i])
        owner = block.module if block.owner is None else block.owner  # a view's pieces hang on the layer
        mlp = next(n for n, m in layers[i].named_modules() if m is owner)
        shared = "—" if block.shared is None else ("gated" if block.shared_gate is not None else "yes")
        rows.append({
            "family": adapter.family,
            "model types": ", ".join(f"`{t}`" for t in adapter.model_types),
            "MoE block": f"`layers[i].{mlp}`" if mlp else "`layers[i]` (router, experts)",
            "shared experts": shared,
            "routing": routing_description(block),
            "condensed to": "experts class, router kept" if block.condense_keeps_router
            else "dense MLP" if block.condenses_to_dense else "experts class",
        })
    return sorted(rows, key=lambda r: r["family"])


def markdown_table(rows: list[dict[str, str]]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row[h] for h in head) + " |" for row in rows]
    return "\n".join(lines)


def families_markdown() -> str:
    """The README's families section: the table of supported families, then those without an adapter."""
    missing = "; ".join(f"`{t}` ({reason})" for t, reason in sorted(NO_ADAPTER_YET.items()))
    text = markdown_table(families_table())
    return text + (f"\n\nNo adapter yet (the error names the reason): {missing}." if missing else "")
