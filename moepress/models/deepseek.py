"""DeepSeek-V2 (`deepseek_v2`, also V2-Lite) and DeepSeek-V3 (`deepseek_v3`, also R1) in transformers v5.

Quirks spelled out here:
- V2: softmax scores over all experts, top-k, NO renormalisation (unless `norm_topk_prob`),
  then `routed_scaling_factor`; with `topk_method="group_limited_greedy"` experts outside the
  best `topk_group` groups (group score = max expert score) are masked to 0 before top-k.
- V3: sigmoid scores; `e_score_correction_bias` is added for the CHOICE only; group score = sum of
  the top-2 biased scores in the group; weights are the unbiased scores of the chosen experts,
  renormalised (+1e-20) when `norm_topk_prob`, then scaled.
- Shared experts are one MLP of `n_shared_experts × moe_intermediate_size` rows, always on, no gate.
- The first `first_k_dense_replace` layers are dense.
"""

from __future__ import annotations

from torch import nn

from moepress.models.base import Adapter, FusedExperts, MoEBlock, Routing, register


@register
class DeepseekV2Adapter(Adapter):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    num_experts_key = "n_routed_experts"

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        gate = mlp.gate
        grouped = gate.topk_method == "group_limited_greedy"
        routing = Routing(
            scoring="softmax",
            top_k=gate.top_k,
            norm_topk=bool(getattr(mlp.config, "norm_topk_prob", False)),
            scaling=float(gate.routed_scaling_factor),
            n_group=gate.num_group if grouped else None,
            topk_group=gate.topk_group if grouped else None,
            group_score="max" if grouped else None,
        )
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=gate.weight,
            routing=routing,
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
            shared=mlp.shared_experts,
        )


@register
class DeepseekV3Adapter(Adapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3",)
    num_experts_key = "n_routed_experts"

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        gate = mlp.gate
        routing = Routing(
            scoring="sigmoid",
            top_k=gate.top_k,
            norm_topk=bool(gate.norm_topk_prob),
            scaling=float(gate.routed_scaling_factor),
            n_group=gate.num_group,
            topk_group=gate.topk_group,
            group_score="top2sum",
            norm_eps=1e-20,
        )
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=gate.weight,
            routing=routing,
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
            shared=mlp.shared_experts,
            correction_bias=gate.e_score_correction_bias,
        )
