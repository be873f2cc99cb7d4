"""Which model types of the installed transformers are Mixture-of-Experts decoders, derived from the
library itself: a causal-LM model type whose modeling file defines a routed-experts class; and which
declared families need a later transformers release.

The lowest module of `models/`: it reads transformers and nothing of moepress's registry, so the
registry (`models.base`) and the declarations (`models.declared`) can both import it.
`models.families` re-exports all of it beside what reads the registered adapters.
"""

from __future__ import annotations

import importlib
import inspect
import re
from functools import cache

from moepress.errors import MoepressError
from moepress.modules.model_type import source_model_type
from moepress.versions import release, transformers_release

__all__ = [
    "NEEDS_NEWER_TRANSFORMERS", "NO_ADAPTER_YET", "check_model_type", "is_transformers_moe",
    "needs_newer_transformers", "release", "transformers_knows", "transformers_moe_model_types",
    "transformers_release",
]

# transformers names its routed-experts classes `<Family>Experts` (fused, `use_experts_implementation`),
# `<Family>ExpertGLU` (DBRX) or `<Family>ParallelExperts` (JetMoE); shared experts are not routed
_EXPERTS_CLASS = re.compile(r"(Experts|ExpertGLU)$")


@cache
def transformers_moe_model_types() -> dict[str, str]:
    """model_type -> causal-LM class name, for every causal LM of the installed transformers whose
    modeling module defines a routed-experts class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        try:
            module = importlib.import_module(getattr(transformers, class_name).__module__)
        except Exception:  # noqa: BLE001 - a model whose optional dependency is missing cannot be loaded anyway
            continue
        prefix = re.sub(r"For\w+$", "", class_name)
        if any(
            inspect.isclass(obj)
            and obj.__module__ == module.__name__
            and _EXPERTS_CLASS.search(name)
            and (not name.endswith("SharedExperts") or name == prefix + "Experts")
            for name, obj in vars(module).items()
        ):
            found[model_type] = class_name
    return found


# model_type -> the transformers release the family's classes came in (`Family.since`), for each declared
# family the installed release is older than (filled by `moepress.models.declared.declare`, which registers
# no adapter for them)
NEEDS_NEWER_TRANSFORMERS: dict[str, str] = {}


def transformers_knows(model_type: str) -> bool:
    """Whether the installed transformers has a config class (and so the model classes) for `model_type`."""
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def needs_newer_transformers(model_type: str) -> str | None:
    """The one-line reason `model_type` (or the source family of a `moepress_<family>` output) cannot be
    used with the installed transformers because its family came in a later release; None if it can."""
    source = source_model_type(model_type)
    since = NEEDS_NEWER_TRANSFORMERS.get(source)
    if since is None:
        return None
    import transformers

    return (
        f"model type {source!r} needs transformers >= {since} (installed: {transformers.__version__}); "
        "pip install -U transformers"
    )


def check_model_type(model_type: str) -> None:
    """Raise `MoepressError` with `needs_newer_transformers`' line, if it has one."""
    reason = needs_newer_transformers(model_type)
    if reason:
        raise MoepressError(reason)


def is_transformers_moe(model_type: str) -> bool:
    """Whether `model_type` is an MoE family of the installed transformers (cheap for known types)."""
    return model_type in transformers_moe_model_types()


# MoE model types of transformers that moepress has no adapter for yet, with the reason (shown to users).
NO_ADAPTER_YET: dict[str, str] = {
}
