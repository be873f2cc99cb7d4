"""MiniCPM-5 MoE (`minicpm5_moe`, openbmb/MiniCPM5-15B-A2.5B).

The MoE block is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`); its router forces float32
logits whatever the activations' dtype (as `Routing.logits_in_fp32` does): sigmoid scores,
`e_score_correction_bias` for the choice only, group-limited top-k (top-2-sum group score, other groups
masked to -inf), the chosen unbiased scores renormalised (+1e-20) when `norm_topk_prob`, times
`routed_scaling_factor`; one always-on ungated shared MLP of `n_shared_experts × moe_intermediate_size`
rows. Dense/MoE per layer from `mlp_layer_types`. The attention (a fused query/output-gate projection)
is outside the block.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

declare(
    Family(
        name="minicpm5_moe",
        since="5.25",
        model_types=("minicpm5_moe",),
        routing=v3_routing,
        num_experts_key="n_routed_experts",
        shared="shared_experts",
        correction_bias="e_score_correction_bias",
        tiny=moe_tiny(),
    )
)
