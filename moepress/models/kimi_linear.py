"""Kimi Linear (`kimi_linear`): Kimi Delta Attention (linear) layers interleaved with MLA layers.

The MoE block is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`); the routed expert
count is `num_experts` (`n_routed_experts` does not exist; `n_group` is an alias of
`num_expert_group`); dense/MoE per layer from `mlp_layer_types`, attention kind from `layer_types`.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="kimi_linear",
    since="5.17",
    model_types=("kimi_linear",),
    routing=v3_routing,
    num_experts_key="num_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    tiny=moe_tiny(layer_types=["linear_attention", "full_attention", "linear_attention"],
                  linear_head_dim=8, linear_num_heads=4),
))
