"""GLM-4.5/4.6 MoE (`glm4_moe`), GLM-4.7-Flash (`glm4_moe_lite`) and GLM-5 (`glm_moe_dsa`).

All three copy DeepSeek-V3's MoE block exactly (`moepress.models.sigmoid_routing.v3_routing`):
sigmoid scores, `e_score_correction_bias` for the choice only, group-limited top-k (top-2-sum group
score), renormalised (+1e-20) when `norm_topk_prob`, times `routed_scaling_factor`; one always-on
shared MLP of `n_shared_experts × moe_intermediate_size` rows, no gate.
- `glm4_moe`: dense layers are the first `first_k_dense_replace`.
- `glm4_moe_lite`: MLA attention; dense/MoE per layer from `mlp_layer_types`.
- `glm_moe_dsa`: MLA + DeepSeek sparse attention (indexer); `mlp_layer_types` as well.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

for _name in ("glm4_moe", "glm4_moe_lite", "glm_moe_dsa"):
    declare(Family(
        name=_name,
        model_types=(_name,),
        routing=v3_routing,
        num_experts_key="n_routed_experts",
        shared="shared_experts",
        correction_bias="e_score_correction_bias",
        # GLM-5's "shared" indexer layers reuse the previous layer's top-k tokens
        carried={"prev_topk_indices": 1} if _name == "glm_moe_dsa" else {},
        tiny=moe_tiny(indexer_types=["full", "shared", "full"]) if _name == "glm_moe_dsa" else moe_tiny(),
    ))
