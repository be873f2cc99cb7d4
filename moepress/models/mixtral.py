"""Mixtral (`mixtral`): softmax, top-2, ALWAYS renormalised over the chosen experts, no shared experts.

The top-k weights stay in float32 (Mixtral does not cast them back). Router jitter noise applies
in training only and is ignored here.
"""

from __future__ import annotations

from torch import nn

from moepress.models.base import Adapter, FusedExperts, MoEBlock, Routing, register


@register
class MixtralAdapter(Adapter):
    family = "mixtral"
    model_types = ("mixtral",)
    num_experts_key = "num_local_experts"
    legacy_expert_names = {"gate": "w1", "up": "w3", "down": "w2"}

    def legacy_aliases(self, name: str) -> list[str]:
        return [name.replace(".mlp.", ".block_sparse_moe.")] if ".mlp." in name else []

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        routing = Routing(scoring="softmax", top_k=mlp.gate.top_k, norm_topk=True, logits_in_fp32=False)
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.gate.weight,
            routing=routing,
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
        )
