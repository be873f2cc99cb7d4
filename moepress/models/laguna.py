"""Laguna (`laguna`).

Router (`LagunaTopKRouter`): logits in the activations' dtype, optionally tanh-softcapped
(`moe_router_logit_softcapping` > 0: cap·tanh(logits/cap)), sigmoid scores, `e_score_correction_bias`
(a router parameter) added for the choice only, no groups, the chosen unbiased scores always
renormalised (no epsilon) and cast to the activations' dtype. The block then multiplies the routed
sum by its own `routed_scaling_factor` (`moe_routed_scaling_factor`) and adds one ungated shared MLP.
`LagunaBlock` applies the softcap before routing and takes the scale from the block.
"""

from __future__ import annotations

import dataclasses

import torch

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


def laguna_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=True, logits_in_fp32=False,
                   weights_to_logits_dtype=True)


class LagunaBlock(MoEBlock):
    def __post_init__(self) -> None:
        self.routing = dataclasses.replace(self.routing, scaling=float(self.module.routed_scaling_factor))

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().router_logits(x)
        cap = self.router.router_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap > 0.0 else logits


declare(Family(
    name="laguna",
    model_types=("laguna",),
    routing=laguna_routing,
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=LagunaBlock,
    tiny=dict(mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads_per_layer=[4, 4, 4],
              layer_types=["full_attention", "sliding_attention", "full_attention"], moe_router_logit_softcapping=3.0),
))
