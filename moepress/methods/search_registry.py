"""Registry of search methods: those that decide by running the model, not from statistics alone.

`methods.base.register_method` registers statistics-driven expert pruning, `(stats, ratio, ...) ->
Selection`. CD-MoE and the layer-drop baseline instead score candidate plans with forward passes on
calibration tokens and choose whole layers, so their entry point is
`(model, input_ids, *, layers=N | memory_budget=F, ..., batch_size, device) -> CompressionPlan`.
They register here under their own names; the CLI asks both registries.
"""

from __future__ import annotations

from collections.abc import Callable

from moepress.errors import MoepressError
from moepress.plan import CompressionPlan, Condense, Drop, LayerAction

SearchMethodFn = Callable[..., CompressionPlan]
# what one chosen layer becomes, given the routed experts kept per layer (0 for none)
LayerChange = Callable[[int], LayerAction]
_SEARCH_METHODS: dict[str, SearchMethodFn] = {}
_LAYER_CHANGES: dict[str, LayerChange] = {}


def condensed(experts: int) -> LayerAction:
    """A condensed layer keeping `experts` routed experts (which ones does not change its size)."""
    return Condense(experts=list(range(experts)), weights=[1.0] * experts)


def register_search_method(
    name: str, layer_change: LayerChange = condensed
) -> Callable[[SearchMethodFn], SearchMethodFn]:
    """Register `fn(model, input_ids, **hp) -> CompressionPlan` under `name` (returned unchanged).

    `layer_change(experts)` is an action of the size a chosen layer ends up with, so callers can
    check a memory budget against the model before any search runs."""

    def decorate(fn: SearchMethodFn) -> SearchMethodFn:
        _SEARCH_METHODS[name] = fn
        _LAYER_CHANGES[name] = layer_change
        return fn

    return decorate


def dropped(_experts: int) -> LayerAction:
    """The layer-drop baseline's change: no MLP at all."""
    return Drop()


def search_layer_change(name: str, experts: int) -> LayerAction:
    """An action of the size search method `name` leaves each chosen layer with."""
    get_search_method(name)
    return _LAYER_CHANGES[name](experts)


def available_search_methods() -> list[str]:
    return sorted(_SEARCH_METHODS)


def get_search_method(name: str) -> SearchMethodFn:
    if name not in _SEARCH_METHODS:
        raise MoepressError(
            f"unknown search method {name!r}; choose one of: {', '.join(sorted(_SEARCH_METHODS))}"
        )
    return _SEARCH_METHODS[name]
