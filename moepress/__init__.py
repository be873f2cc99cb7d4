"""moepress: structured compression of Mixture-of-Experts language models.

Kept light: `import moepress` does not import torch; `moepress.load` resolves on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load":
        from moepress.io.load import load

        return load
    raise AttributeError(f"module 'moepress' has no attribute {name!r}")
