"""Which vLLM releases the plugin serves moepress checkpoints on, and the one error for the others.

Kept free of vllm imports beyond `vllm.__version__` so the plugin's `register()` can ask cheaply.
"""

from __future__ import annotations

import importlib.util

from moepress.errors import MoepressError

# run by tests/serving on every change
TESTED = ("0.32",)
# written against their source (the same fused-MoE runner API), not run
WRITTEN_FOR = ("0.33", "0.34")
NATIVE_SUBSTITUTION_MODULE = "vllm.model_executor.layers.fused_moe.expert_substitution"


def vllm_release() -> str:
    """`major.minor` of the installed vLLM."""
    import vllm

    return ".".join(vllm.__version__.split(".")[:2])


def check_vllm_version(what: str) -> None:
    """Raise one clear error when the installed vLLM is not one the plugin knows; `what` names the checkpoint kind."""
    release = vllm_release()
    if release not in TESTED + WRITTEN_FOR:
        known = ", ".join(f"{v}.x" for v in TESTED + WRITTEN_FOR)
        raise MoepressError(
            f"moepress serves {what} checkpoints on vLLM {known} (tested: {', '.join(TESTED)}.x); "
            f"the installed vLLM is {release}: install one of those, or load the model with moepress.load"
        )


def has_native_substitution() -> bool:
    """Whether vLLM serves `approximate_experts` (MoNE novices) itself (0.33 and later)."""
    try:
        return importlib.util.find_spec(NATIVE_SUBSTITUTION_MODULE) is not None
    except ImportError:
        return False
