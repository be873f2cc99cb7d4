"""Liquid LFM2-MoE (`lfm2_moe`): hybrid short-convolution/attention decoder with sigmoid-routed MoE.

Quirks spelled out here:
- The MLP is `layer.feed_forward`: dense for the first `num_dense_layers` layers, else an
  `Lfm2MoeSparseMoeBlock` (router `gate`, experts `experts`); `layer_types` lists "conv" and
  "full_attention" layers. The final norm is `model.embedding_norm`.
- Routing: logits in the activations' dtype, sigmoid scores; with `use_expert_bias` the BLOCK's buffer
  `expert_bias` (not the router's) is added for the choice only and the weights are the unbiased
  scores of the chosen experts; renormalised with +1e-6 when `norm_topk_prob`; times
  `routed_scaling_factor`. `Lfm2MoeBlock` reads the bias from the block.
- NOT declared yet: surgery slices only the router's and the experts' per-expert tensors, so a pruned
  LFM2-MoE would keep an E-sized `expert_bias` (see LFM2_MOE below).
"""

from __future__ import annotations

import dataclasses

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


@dataclasses.dataclass
class Lfm2MoeBlock(MoEBlock):
    def __post_init__(self):
        self.correction_bias = getattr(self.module, "expert_bias", None)


def lfm2_routing(router, config) -> Routing:
    return Routing(
        scoring="sigmoid",
        top_k=router.top_k,
        norm_topk=bool(router.norm_topk_prob),
        scaling=float(router.routed_scaling_factor),
        logits_in_fp32=False,
        norm_eps=1e-6,
    )


LFM2_MOE = Family(
    name="lfm2_moe",
    model_types=("lfm2_moe",),
    routing=lfm2_routing,
    mlp=("feed_forward",),
    norm="model.embedding_norm",
    block_cls=Lfm2MoeBlock,
    tiny=dict(layer_types=["conv", "full_attention", "conv"], num_dense_layers=1),
)
declare(LFM2_MOE)
