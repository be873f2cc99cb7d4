"""Qwen3-MoE in vLLM: `MoepressQwen3MoeForCausalLM`, and the source architecture for `approximate_experts`
checkpoints on a vLLM without expert substitution."""

from __future__ import annotations

from vllm.model_executor.models import qwen3_moe
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from moepress.serving.machinery import CompressedMoEModel, Family, sized_by_text_config

FAMILY = Family(module=qwen3_moe, block="Qwen3MoeSparseMoeBlock", sized_block=sized_by_text_config("num_experts"))


class MoepressQwen3MoeForCausalLM(CompressedMoEModel, Qwen3MoeForCausalLM):
    """A moepress-compressed Qwen3-MoE checkpoint (`model_type: moepress_qwen3_moe`)."""

    family = FAMILY


class NativeQwen3MoeForCausalLM(MoepressQwen3MoeForCausalLM):
    """`Qwen3MoeForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True
