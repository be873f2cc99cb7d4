"""Mixtral in vLLM: `MoepressMixtralForCausalLM`, and the source architecture for `approximate_experts`
checkpoints on a vLLM without expert substitution. vLLM names the block `block_sparse_moe` and the experts'
tensors w1 (gate), w3 (up), w2 (down), as the original Mixtral checkpoints do."""

from __future__ import annotations

from vllm.model_executor.models import mixtral
from vllm.model_executor.models.mixtral import MixtralForCausalLM

from moepress.serving.machinery import CompressedMoEModel, Family, sized_by_argument

FAMILY = Family(
    module=mixtral,
    block="MixtralMoE",
    sized_block=sized_by_argument("num_experts"),
    num_experts_key="num_local_experts",
    mlp="block_sparse_moe",
    expert_names=("w1", "w3", "w2"),
)


class MoepressMixtralForCausalLM(CompressedMoEModel, MixtralForCausalLM):
    """A moepress-compressed Mixtral checkpoint (`model_type: moepress_mixtral`)."""

    family = FAMILY


class NativeMixtralForCausalLM(MoepressMixtralForCausalLM):
    """`MixtralForCausalLM` itself, plus `approximate_experts` novices (stock when the config has none)."""

    native_architecture = True
