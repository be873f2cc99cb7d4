"""Flint (`flint`): Qwen-style MoE block with sigmoid routing and an always-on shared expert.

Quirks spelled out here:
- Router logits in float32 (float32 router weight, autocast off), SIGMOID scores without any expert
  bias, top-k, renormalised over the chosen k when `norm_topk_prob`, no scaling.
- One shared expert (`shared_expert`, `shared_expert_intermediate_size` rows) added in full, NO gate
  (unlike Qwen2-MoE).
- Layers in `mlp_only_layers` (default the first two) are dense.
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def flint_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=bool(router.norm_topk_prob))


declare(Family(
    name="flint",
    since="5.21",
    model_types=("flint",),
    routing=flint_routing,
    shared="shared_expert",
    tiny=dict(mlp_only_layers=[0]),
))
