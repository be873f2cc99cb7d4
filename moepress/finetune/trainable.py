"""Which parameters light fine-tuning may change: those of the condensed layers, nothing else.

A condensed layer replaces a whole MoE block with one dense MLP whose fixed routing weights were
estimated, not learned; those few parameters are where a short fine-tune recovers most (CD-MoE §4).
The modules are found by type (`CondensedMLP`, what `surgery.apply_plan` builds, or the family's own
dense MLP at a layer its config lists as dense: `surgery.dense`) inside the decoder layers the plan
condenses, so a plan that was not applied, or a model from elsewhere, is refused instead of silently
training the wrong weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from moepress.errors import MoepressError
from moepress.models import get_adapter
from moepress.modules import CondensedMLP
from moepress.plan import CompressionPlan, Condense


def condensed_modules(model: nn.Module, plan: CompressionPlan) -> dict[int, nn.Module]:
    """The `CondensedMLP` of each layer `plan` condenses, by layer index."""
    adapter = get_adapter(model, require_moe=False)
    layers = adapter.layers(model)
    ids = sorted(i for i, a in plan.layers.items() if isinstance(a, Condense))
    if not ids:
        raise MoepressError(f"plan ({plan.method}) condenses no layer; there is nothing to fine-tune")
    placement = adapter.dense_placement(model.config)
    listed = set(getattr(model.config.get_text_config(), placement.key, None) or []) if placement else set()
    out: dict[int, nn.Module] = {}
    for i in ids:
        found = [m for m in layers[i].modules() if isinstance(m, CondensedMLP)]
        if not found and i in listed:  # written as the family's own dense MLP (`surgery.dense`)
            found = [layers[i].get_submodule(placement.path)]
        if len(found) != 1:
            raise MoepressError(
                f"layer {i} holds no condensed MLP; apply the plan first (moepress.surgery.apply_plan)"
            )
        out[i] = found[0]
    return out


@contextmanager
def only_trainable(model: nn.Module, modules: list[nn.Module]) -> Iterator[list[nn.Parameter]]:
    """Inside the block only `modules`' parameters require grad; every flag is restored afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        params: list[nn.Parameter] = []
        seen: set[int] = set()
        for m in modules:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    p.requires_grad_(True)
                    params.append(p)
        yield params
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
