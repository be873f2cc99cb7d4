"""Kolibri-1 (`kolibri1`).

- Router logits in float32. The top-k is chosen on the RAW logits plus `e_score_correction_bias`
  (not on sigmoid scores plus the bias, as DeepSeek-V3), the weights are the sigmoid of the chosen
  logits, renormalised only when `norm_topk_prob`. `Routing` cannot say "choose on logits", so the
  block overrides `route`.
- One ungated shared expert (`shared_experts`), added in full.
- Sliding / full attention layers (full every 5th), every layer MoE; extra post-attention and
  post-MLP norms in the decoder layer, outside the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepress.models.base import MoEBlock, RouteResult, Routing
from moepress.models.declared import Family, declare


def kolibri_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=bool(router.norm_topk_prob))


@dataclass
class KolibriBlock(MoEBlock):
    def route(self, x, active=None, logits=None) -> RouteResult:
        r = self.routing
        logits, ids, bias = self.active_logits(x, active, logits)
        local = torch.topk(logits + bias.float(), r.top_k, dim=-1)[1]
        weights = logits.gather(1, local).sigmoid()
        if r.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouteResult(logits=logits, scores=logits.sigmoid(), weights=weights, index=ids[local])


declare(Family(
    name="kolibri1",
    since="5.20",
    model_types=("kolibri1",),
    routing=kolibri_routing,
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=KolibriBlock,
    tiny=dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4),
))
