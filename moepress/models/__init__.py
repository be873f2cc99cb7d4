"""Model-family adapters: the only place that knows how each family lays out its MoE layers."""

from moepress.models.base import Adapter, MoEBlock, RouteResult, Routing, get_adapter, supported_families

__all__ = ["Adapter", "MoEBlock", "RouteResult", "Routing", "get_adapter", "supported_families"]
