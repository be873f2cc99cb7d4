"""Model-family adapters: the only place that knows how each family lays out its MoE layers.

Importing this package registers every family: `base` holds the registry and imports no family; each
family file registers its adapter when imported, and the loop below imports them all, once.
"""

import importlib
import pkgutil

from moepress.models.base import Adapter, MoEBlock, RouteResult, Routing, get_adapter, supported_families

__all__ = ["Adapter", "MoEBlock", "RouteResult", "Routing", "get_adapter", "supported_families"]

# modules of this package that are not a family (each family file registers its adapter when imported)
_NOT_FAMILY_FILES = {"base", "declared", "families", "loading", "tiny", "transformers_moe"}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _NOT_FAMILY_FILES:
        importlib.import_module(f"{__name__}.{_info.name}")
del _info
