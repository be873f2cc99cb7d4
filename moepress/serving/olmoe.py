"""OLMoE in vLLM: `MoepressOlmoeForCausalLM`, and the source architecture for `approximate_experts`
checkpoints on a vLLM without expert substitution."""

from __future__ import annotations

from vllm.model_executor.models import olmoe
from vllm.model_executor.models.olmoe import OlmoeForCausalLM

from moepress.serving.machinery import CompressedMoEModel, Family, sized_by_argument

FAMILY = Family(module=olmoe, block="OlmoeMoE", sized_block=sized_by_argument("num_experts"))


class MoepressOlmoeForCausalLM(CompressedMoEModel, OlmoeForCausalLM):
    """A moepress-compressed OLMoE checkpoint (`model_type: moepress_olmoe`)."""

    family = FAMILY


class NativeOlmoeForCausalLM(MoepressOlmoeForCausalLM):
    """`OlmoeForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True
