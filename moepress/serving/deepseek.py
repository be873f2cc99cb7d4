"""DeepSeek-V2 and -V3 in vLLM (both built by vLLM's deepseek_v2 module): `MoepressDeepseekV2ForCausalLM`,
`MoepressDeepseekV3ForCausalLM`, and the source architectures for `approximate_experts` checkpoints on a
vLLM without expert substitution. Shared experts stay in the block (a condensed layer has them folded in)."""

from __future__ import annotations

from vllm.model_executor.models import deepseek_v2
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from moepress.serving.machinery import CompressedMoEModel, Family, sized_by_config

FAMILY = Family(
    module=deepseek_v2,
    block="DeepseekV2MoE",
    sized_block=sized_by_config("n_routed_experts"),
    num_experts_key="n_routed_experts",
)


class MoepressDeepseekV2ForCausalLM(CompressedMoEModel, DeepseekV2ForCausalLM):
    """A moepress-compressed DeepSeek-V2 checkpoint (`model_type: moepress_deepseek_v2`)."""

    family = FAMILY


class NativeDeepseekV2ForCausalLM(MoepressDeepseekV2ForCausalLM):
    """`DeepseekV2ForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True


class MoepressDeepseekV3ForCausalLM(CompressedMoEModel, DeepseekV3ForCausalLM):
    """A moepress-compressed DeepSeek-V3 checkpoint (`model_type: moepress_deepseek_v3`)."""

    family = FAMILY


class NativeDeepseekV3ForCausalLM(MoepressDeepseekV3ForCausalLM):
    """`DeepseekV3ForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True
