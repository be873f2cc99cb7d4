"""DeepSeek-V3.2 (`deepseek_v32`): DeepSeek-V3 with sparse attention (a lightning indexer).

The MoE block is DeepSeek-V3's unchanged (see `moepress.models.sigmoid_routing.v3_routing`); its
dense/MoE layer pattern comes from `mlp_layer_types` (the first `first_k_dense_replace`, 3 by
default, dense). The hand-written `DeepseekV3Adapter` matches only `deepseek_v3`.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="deepseek_v32",
    model_types=("deepseek_v32",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    tiny=moe_tiny(),
))
