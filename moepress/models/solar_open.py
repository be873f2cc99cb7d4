"""Solar Open (`solar_open`): GLM-4.5-style decoder where every layer is MoE.

The block is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`: sigmoid, correction bias
for the choice, group-limited top-k, renormalised, scaled) with one ungated shared MLP.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import v3_routing

declare(Family(
    name="solar_open",
    model_types=("solar_open",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
))
