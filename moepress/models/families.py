"""The MoE families: which model types of the installed transformers are Mixture-of-Experts decoders
(`models.transformers_moe`, re-exported here) and what the registered adapters make of them, as the
table `moepress families` prints.

tests/test_adapters.py compares this list with the families moepress has adapters for, so a
transformers release that adds an MoE family fails the suite by that family's name.
"""

from __future__ import annotations

from moepress.models import base
from moepress.models.tiny import tiny_model
from moepress.models.transformers_moe import (
    NEEDS_NEWER_TRANSFORMERS,
    NO_ADAPTER_YET,
    check_model_type,
    is_transformers_moe,
    needs_newer_transformers,
    release,
    transformers_knows,
    transformers_moe_model_types,
    transformers_release,
)

__all__ = [
    "NEEDS_NEWER_TRANSFORMERS", "NO_ADAPTER_YET", "check_model_type", "families_markdown", "families_table",
    "is_transformers_moe", "markdown_table", "needs_newer_transformers", "release", "routing_description",
    "supported_model_types", "transformers_knows", "transformers_moe_model_types", "transformers_release",
]


def supported_model_types() -> set[str]:
    """Every model_type some registered adapter accepts."""
    return {t for adapter in base._REGISTRY for t in adapter.model_types}


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
    """One row per registered family, read from a tiny random model of it (`models.tiny`): model
    types, where the MoE block lives, shared experts, routing and the condensed form."""
    rows = []
    for adapter in base._REGISTRY:
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
    """The families section of docs/families.md: the table of supported families, then those without an adapter."""
    missing = "; ".join(f"`{t}` ({reason})" for t, reason in sorted(NO_ADAPTER_YET.items()))
    text = markdown_table(families_table())
    return text + (f"\n\nNo adapter yet (the error names the reason): {missing}." if missing else "")
