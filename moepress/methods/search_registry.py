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
from moepress.plan import CompressionPlan

SearchMethodFn = Callable[..., CompressionPlan]
_SEARCH_METHODS: dict[str, SearchMethodFn] = {}


def register_search_method(name: str) -> Callable[[SearchMethodFn], SearchMethodFn]:
    """Register `fn(model, input_ids, **hp) -> CompressionPlan` under `name` (returned unchanged)."""

    def decorate(fn: SearchMethodFn) -> SearchMethodFn:
        _SEARCH_METHODS[name] = fn
        return fn

    return decorate


def _load_all() -> None:
    # Importing the method files registers them; lazy so this module has no import cycle.
    from moepress.methods import cd_moe  # noqa: F401


def available_search_methods() -> list[str]:
    _load_all()
    return sorted(_SEARCH_METHODS)


def get_search_method(name: str) -> SearchMethodFn:
    _load_all()
    if name not in _SEARCH_METHODS:
        raise MoepressError(
            f"unknown search method {name!r}; choose one of: {', '.join(sorted(_SEARCH_METHODS))}"
        )
    return _SEARCH_METHODS[name]
