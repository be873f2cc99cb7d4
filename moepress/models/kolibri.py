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

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult, Routing
from moepress.models.declared import Family, declare


def kolibri_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=bool(router.norm_topk_prob))


@dataclass
class KolibriBlock(MoEBlock):
    def route(self, x, active=None, logits=None) -> RouteResult:
        r = self.routing
        if logits is None:
            logits = self.router_logits(x)
        ids = torch.arange(logits.shape[-1], device=logits.device)
        bias = self.correction_bias
        if active is not None:
            ids = torch.as_tensor(active, device=logits.device, dtype=torch.long)
            logits = logits.index_select(-1, ids)
            bias = bias.index_select(0, ids)
        if r.top_k > logits.shape[-1]:
            raise MoepressError(
                f"layer {self.layer_idx}: top_k={r.top_k} but only {logits.shape[-1]} experts remain; keep more experts"
            )
        local = torch.topk(logits + bias.float(), r.top_k, dim=-1)[1]
        weights = logits.gather(1, local).sigmoid()
        if r.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouteResult(logits=logits, scores=logits.sigmoid(), weights=weights, index=ids[local])


declare(Family(
    name="kolibri1",
    model_types=("kolibri1",),
    routing=kolibri_routing,
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=KolibriBlock,
    tiny=dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=4),
))
