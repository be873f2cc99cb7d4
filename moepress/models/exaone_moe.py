"""EXAONE MoE (`exaone_moe`, K-EXAONE).

The block (`ExaoneMoeSparseMoEBlock`) is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`):
sigmoid scores, correction bias for the choice, group-limited top-k, renormalised (+1e-20), times
`routed_scaling_factor`; one ungated shared MLP of `num_shared_experts × moe_intermediate_size` rows.
The routed expert count is `num_experts`; dense/MoE per layer from `mlp_layer_types`.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="exaone_moe",
    model_types=("exaone_moe",),
    routing=v3_routing,
    num_experts_key="num_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    tiny=moe_tiny(layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
))
