"""Hunyuan V4 (`hy_v4`): MLA + sparse (indexed) attention decoder with DeepSeek-V3's MoE block.

Routing is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`); one ungated shared MLP.
The routed experts' activation is a clamped SwiGLU (`HYV4Experts._apply_gate`: gate clamped from
above and up clamped to ±`swiglu_limit`, then silu(gate)·up), which `TransformersExperts` runs
through the experts module itself. Dense/MoE per layer from `mlp_layer_types`. Decoder layers
carry 4 hyper-connection streams and return `(hidden, topk_indices)`; a `"shared"` indexer layer
reuses the previous layer's top-k (`prev_topk_indices`), which layer-by-layer runs carry from layer
to layer (`carried`); the tiny model has one shared layer.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(Family(
    name="hy_v4",
    since="5.17",
    model_types=("hy_v4",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    norm=("model.hc_head", "model.norm"),  # the 4 streams collapse, then the final norm
    carried={"prev_topk_indices": 1},
    tiny=moe_tiny(index_topk=4, index_head_dim=8, index_n_heads=2, indexer_types=["full", "shared", "full"]),
))
