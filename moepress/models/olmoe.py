"""OLMoE (`olmoe`): softmax over all experts, top-k, optional renormalisation, no shared experts.

Like Qwen, router logits are in the activations' dtype and the top-k weights are cast back to it.
Every layer is MoE.
"""

from __future__ import annotations

from torch import nn

from moepress.models.base import Adapter, FusedExperts, MoEBlock, Routing, register


@register
class OlmoeAdapter(Adapter):
    family = "olmoe"
    model_types = ("olmoe",)
    num_experts_key = "num_experts"

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        routing = Routing(
            scoring="softmax",
            top_k=mlp.gate.top_k,
            norm_topk=bool(mlp.gate.norm_topk_prob),
            logits_in_fp32=False,
            weights_to_logits_dtype=True,
        )
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.gate.weight,
            routing=routing,
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
        )
