"""MiMo-V2-Flash (`mimo_v2_flash`): hybrid sliding-window / full attention.

The MoE block is DeepSeek-V3's without shared experts (`moepress.models.sigmoid_routing.v3_routing`:
sigmoid, correction bias for the choice, group-limited top-k, renormalised, scaled); dense/MoE per
layer from `mlp_layer_types` (layer 0 dense by default).
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="mimo_v2_flash",
    model_types=("mimo_v2_flash",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    correction_bias="e_score_correction_bias",
    tiny=moe_tiny(layer_types=["full_attention", "sliding_attention", "full_attention"]),
))
