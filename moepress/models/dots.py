"""dots.llm1 (`dots1`), rednote's DeepSeek-V3-style MoE decoder.

The block is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`: sigmoid scores, correction
bias for the choice, group-limited top-k, renormalised only when `norm_topk_prob` (False by
default), times `routed_scaling_factor`) with one ungated shared MLP of
`n_shared_experts × moe_intermediate_size` rows. The first `first_k_dense_replace` layers are dense.
The config's `n_routed_experts` / `n_shared_experts` default to None, so the tiny model sets them.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="dots1",
    model_types=("dots1",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    tiny=moe_tiny(n_routed_experts=8, n_shared_experts=1, max_window_layers=3),
))
