"""Param-2 MoE (`param2moe`, BharatGen Param2-17B-A2.4B), built as transformers' `Glm4MoeForCausalLM`.

The MoE block is GLM-4-MoE's, i.e. DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`): sigmoid
scores, `e_score_correction_bias` for the choice only, group-limited top-k (one group in the released
config), renormalised (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`; one always-on ungated
shared MLP of `n_shared_experts × moe_intermediate_size` rows; the first `first_k_dense_replace` layers
dense. Declared by its own model type, since the `glm4_moe` adapter matches only `glm4_moe`; a pruned
checkpoint keeps `model_type` `param2moe`, so transformers rebuilds it with the same class.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(
    Family(
        name="param2moe",
        since="5.25",
        model_types=("param2moe",),
        routing=v3_routing,
        num_experts_key="n_routed_experts",
        shared="shared_experts",
        correction_bias="e_score_correction_bias",
        tiny=moe_tiny(),
    )
)
