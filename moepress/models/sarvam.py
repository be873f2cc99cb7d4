"""Sarvam-M MLA (`sarvam_mla`, built as transformers' `DeepseekV3ForCausalLM`) and Sarvam MoE
(`sarvam_moe`, built as `Glm4MoeForCausalLM`).

Both are DeepSeek-V3 MoE blocks (`moepress.models.sigmoid_routing.v3_routing`): sigmoid scores,
correction bias for the choice only, group-limited top-k, renormalised (+1e-20), times
`routed_scaling_factor`; one ungated shared MLP. Declared by their own model types, since the
`deepseek_v3` / `glm4_moe` adapters match only those model types; a pruned checkpoint keeps
`model_type` `sarvam_*`, so transformers rebuilds it with the same class.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

for _name in ("sarvam_mla", "sarvam_moe"):
    declare(Family(
        name=_name,
        since="5.24",
        model_types=(_name,),
        routing=v3_routing,
        num_experts_key="n_routed_experts",
        shared="shared_experts",
        correction_bias="e_score_correction_bias",
        tiny=moe_tiny(),
    ))
