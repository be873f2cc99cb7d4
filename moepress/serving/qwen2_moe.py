"""Qwen2-MoE (gated shared expert) in vLLM: `MoepressQwen2MoeForCausalLM`, and the source architecture for
`approximate_experts` checkpoints on a vLLM without expert substitution."""

from __future__ import annotations

from vllm.model_executor.models import qwen2_moe
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM

from moepress.serving.machinery import CompressedMoEModel, Family, sized_by_config

FAMILY = Family(module=qwen2_moe, block="Qwen2MoeSparseMoeBlock", sized_block=sized_by_config("num_experts"))


class MoepressQwen2MoeForCausalLM(CompressedMoEModel, Qwen2MoeForCausalLM):
    """A moepress-compressed Qwen2-MoE checkpoint (`model_type: moepress_qwen2_moe`)."""

    family = FAMILY


class NativeQwen2MoeForCausalLM(MoepressQwen2MoeForCausalLM):
    """`Qwen2MoeForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True
