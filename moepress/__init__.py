"""moepress: structured compression of Mixture-of-Experts language models.

Kept light: `import moepress` does not import torch; `moepress.load` and `moepress.compress` resolve
on first use.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "load":
        from moepress.io.load import load

        return load
    if name == "compress":
        # the function lives in moepress.compression: a submodule named `compress` would replace this
        # attribute with itself as soon as anything imported it
        from moepress.compression import compress

        return compress
    raise AttributeError(f"module 'moepress' has no attribute {name!r}")
