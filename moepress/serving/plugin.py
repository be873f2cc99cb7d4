"""The vLLM general plugin (entry point `vllm.general_plugins: moepress = moepress.serving.plugin:register`).

vLLM calls `register()` in every process before it reads a model. It registers, lazily (by "module:Class"
strings, so nothing is imported until such a model is served):
- each family's `Moepress<Arch>` with vLLM's ModelRegistry, and the `moepress_<type>` config with
  transformers' AutoConfig, so a moepress checkpoint loads without trust_remote_code;
- on a vLLM without expert substitution (before 0.33), the family's SOURCE architecture, so an
  `approximate_experts` (MoNE native format) checkpoint gets its novices instead of missing experts; the
  class builds and loads exactly as stock for any config without `approximate_experts`.
It never raises: a failure here would break vLLM for every model, so it is logged and moepress models then
fail to resolve on their own.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

logger = logging.getLogger(__name__)


class Served(NamedTuple):
    """One family the plugin serves: transformers' model_type and config class, vLLM's architecture, our file."""

    model_type: str
    config_class: str
    architecture: str
    module: str


FAMILIES = (
    Served("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "qwen2_moe"),
    Served("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "olmoe"),
    Served("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3_moe"),
    Served("mixtral", "MixtralConfig", "MixtralForCausalLM", "mixtral"),
    Served("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", "deepseek"),
    Served("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "deepseek"),
)


def register() -> None:
    """Register moepress's architectures and configs with vLLM and transformers (see the module docstring)."""
    try:
        _register()
    except Exception:  # never break vLLM for models that are not moepress's
        logger.exception("moepress: the vLLM plugin could not register its models")


def _register() -> None:
    import transformers
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from moepress.io.load import compressed_config_class
    from moepress.modules.model_type import compressed_class_name, compressed_model_type
    from moepress.serving.versions import has_native_substitution

    native = has_native_substitution()
    for family in FAMILIES:
        model_type = compressed_model_type(family.model_type)
        config_class = compressed_config_class(getattr(transformers, family.config_class), model_type)
        AutoConfig.register(model_type, config_class, exist_ok=True)
        arch = compressed_class_name(family.architecture)
        ModelRegistry.register_model(arch, f"moepress.serving.{family.module}:{arch}")
        if not native:
            native_class = "Native" + family.architecture
            ModelRegistry.register_model(family.architecture, f"moepress.serving.{family.module}:{native_class}")
