"""One generic adapter for the transformers 5.x MoE layout, driven by small per-family declarations.

transformers 5.x stores most families' routed experts in one experts module declared with
`use_experts_implementation` (fused `gate_up_proj`/`down_proj`, layout flags on the instance), next
to a router module and optional shared experts. What still differs between families is routing
(softmax or sigmoid, renormalisation, scaling, group-limited choice, correction bias), where the
pieces live (`layer.mlp.gate` vs `layer.block_sparse_moe.router`) and which config field counts the
experts. A `Family` says exactly that, and `DeclaredAdapter` does the rest; a family whose block is
genuinely different gives its own `MoEBlock` subclass (`block_cls`) or `ExpertStore` (`store`).

Each declaration is checked against the model's own block by `tests/test_adapters.py` (float32,
random tiny model from `moepress.testing.tiny_model`), so a declaration that misreads the family fails
there, not in a user's output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from moepress.models.base import (
    Adapter,
    ExpertStore,
    MoEBlock,
    Routing,
    TransformersExperts,
    register_adapter,
)
from moepress.models.transformers_moe import NEEDS_NEWER_TRANSFORMERS, release, transformers_release

RoutingRule = Callable[[nn.Module, Any], Routing]  # (router module, text config) -> Routing


def attr(obj: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` that `obj` has (families name the same field differently)."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return default


@dataclass(frozen=True)
class Family:
    """What one family's MoE layer looks like: names and routing, nothing else.

    - `mlp`: attribute(s) of the decoder layer that may hold the MoE block (first present wins);
    - `router`, `experts`, `shared`, `shared_gate`: attributes of the block (shared ones optional);
    - `router_bias` / `correction_bias`: attributes of the router module, when it has them;
    - `routing`: builds the `Routing` from the router module and the text config;
    - `layers`: dotted path of the decoder layers from the top model (VLM wrappers differ);
    - `norm`: dotted path of what runs between the last decoder layer and the LM head, or several
      applied in order (hyper-connection families collapse their streams before the norm);
    - `tiny`: overrides on top of moepress.models.tiny's generic tiny config (or a function editing it).
    """

    name: str
    model_types: tuple[str, ...]
    routing: RoutingRule
    num_experts_key: str = "num_experts"
    mlp: tuple[str, ...] = ("mlp",)
    router: str = "gate"
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    router_bias: str | None = None
    correction_bias: str | None = None
    layers: str = "model.layers"
    norm: str | tuple[str, ...] = "model.norm"
    block_cls: type[MoEBlock] = MoEBlock
    store: Callable[[nn.Module], ExpertStore] = TransformersExperts
    tiny: dict[str, Any] | Callable[[Any], None] = field(default_factory=dict)
    returns_tuple: bool = False  # the block returns (output, router scores): gpt-oss, Llama-4
    carried: dict[str, int] = field(default_factory=dict)  # see `Adapter.carried`
    # see `Adapter.state_arguments` / `hand_on`: (layer, kwargs, hidden_in, output) -> next layer's state
    state_arguments: tuple[str, ...] = ()
    hand_on: Callable[[nn.Module, dict, Any, Any], dict] | None = None
    note: str = ""
    # the transformers release that added the family's model type(s), or the classes the declaration reads,
    # when that is newer than the oldest release pyproject.toml admits: on an older one the family is not
    # registered, and asking for it names the release to install (tests/test_families.py checks it)
    since: str | None = None


class _RoutingFields:
    """The router module for a `RoutingRule`, with the block's attributes behind its own: before their
    router classes (Jamba's until transformers 5.21) families had a plain `nn.Linear` router and kept
    `top_k` and the like on the block."""

    def __init__(self, router: nn.Module, block: nn.Module):
        self._router, self._block = router, block

    def __getattr__(self, name: str) -> Any:
        if hasattr(self._router, name):
            return getattr(self._router, name)
        if isinstance(self._router, nn.Linear) and hasattr(self._block, name):
            return getattr(self._block, name)
        raise AttributeError(name)


class DeclaredAdapter(Adapter):
    """The adapter for one `Family` declaration."""

    def __init__(self, spec: Family):
        self.spec = spec
        self.family = spec.name
        self.model_types = spec.model_types
        self.num_experts_key = spec.num_experts_key
        self.carried = spec.carried
        self.state_arguments = spec.state_arguments
        if spec.hand_on is not None:
            self.hand_on = spec.hand_on

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.spec.layers)

    def final_norm(self, model: nn.Module) -> nn.Module:
        if isinstance(self.spec.norm, str):
            return model.get_submodule(self.spec.norm)
        return nn.Sequential(*(model.get_submodule(name) for name in self.spec.norm))

    def _mlp(self, layer: nn.Module) -> nn.Module | None:
        for name in self.spec.mlp:
            module = getattr(layer, name, None)
            if module is not None:
                return module
        return None

    def is_moe(self, layer: nn.Module) -> bool:
        mlp = self._mlp(layer)
        return mlp is not None and hasattr(mlp, self.spec.experts) and hasattr(mlp, self.spec.router)

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        spec, mlp = self.spec, self._mlp(layer)
        router = getattr(mlp, spec.router)
        config = attr(mlp, "config", default=None) or attr(router, "config", default=None)
        return spec.block_cls(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=router.weight,
            routing=spec.routing(_RoutingFields(router, mlp), config),
            experts=spec.store(getattr(mlp, spec.experts)),
            shared=getattr(mlp, spec.shared, None) if spec.shared else None,
            shared_gate=getattr(mlp, spec.shared_gate, None) if spec.shared_gate else None,
            router_bias=getattr(router, spec.router_bias, None) if spec.router_bias else None,
            correction_bias=getattr(router, spec.correction_bias, None) if spec.correction_bias else None,
            returns_tuple=spec.returns_tuple,
        )

    def component(self, name: str) -> str:
        spec = self.spec
        for mlp in spec.mlp:
            if f".{mlp}." not in name:
                continue
            if spec.shared and f".{mlp}.{spec.shared}." in name:
                return "shared_experts"
            if spec.shared_gate and f".{mlp}.{spec.shared_gate}." in name:
                return "shared_experts"
            if f".{mlp}.{spec.experts}." in name or f".{mlp}.novices" in name:
                return "routed_experts"
            if f".{mlp}.{spec.router}." in name:
                return "router"
        return super().component(name)


FAMILIES: dict[str, Family] = {}


def declare(spec: Family) -> Family:
    """Register a family declaration (one call per family, in its adapter file); a family whose classes
    came in a later transformers than the installed one (`since`) is recorded in `NEEDS_NEWER_TRANSFORMERS`
    instead, so asking for it names the release to install."""
    if spec.since is not None and transformers_release() < release(spec.since):
        for model_type in spec.model_types:
            NEEDS_NEWER_TRANSFORMERS[model_type] = spec.since
        return spec
    FAMILIES[spec.name] = spec
    register_adapter(DeclaredAdapter(spec))
    return spec
