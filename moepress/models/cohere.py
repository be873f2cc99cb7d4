"""Cohere2-MoE (`cohere2_moe`).

- The router takes the top-k of the raw logits, then either softmaxes those k logits
  (`expert_selection_fn="softmax"`: the same as softmax over all experts, top-k, renormalised) or
  takes their sigmoid, renormalised when `norm_topk_prob`. Logits in the activations' dtype; the
  weights cast back to it.
- Optional shared experts (`num_shared_experts` × `intermediate_size` rows in one ungated MLP),
  combined by `shared_expert_combination_strategy`: "sum" adds them, "average" returns
  `(routed + shared) / 2`, expressed here as routing weights × 0.5 plus half the shared output.
  A condensed "average" layer keeps the shared expert at full weight (surgery copies its rows as
  they are), so the block view models exactly that under a condense action.
- Dense prefix layers are those marked "dense" in `mlp_layer_types` (`first_k_dense_replace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


def cohere_routing(router, config) -> Routing:
    softmax = router.expert_selection_fn == "softmax"
    return Routing(
        scoring="softmax" if softmax else "sigmoid",
        top_k=router.top_k,
        norm_topk=softmax or bool(router.norm_topk_prob),
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


@dataclass
class Cohere2MoeBlock(MoEBlock):
    """The "average" combination: half the routed output plus half the shared output."""

    @property
    def _average(self) -> bool:
        return self.shared is not None and self.module.shared_expert_combination_strategy == "average"

    def route(self, x, active=None, logits=None):
        result = super().route(x, active, logits)
        if self._average:
            result.weights = result.weights * 0.5
        return result

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        out = super().shared_out(x)
        halve = self._average and not getattr(self, "_condensing", False)
        return out / 2 if out is not None and halve else out

    def forward(self, x, action=None, novices=None):
        # surgery condenses the shared expert as it is (unhalved): model exactly what it writes
        self._condensing = action is not None and action.action == "condense"
        try:
            return super().forward(x, action, novices)
        finally:
            self._condensing = False


declare(Family(
    name="cohere2_moe",
    model_types=("cohere2_moe",),
    routing=cohere_routing,
    shared="shared_experts",
    block_cls=Cohere2MoeBlock,
    tiny=dict(intermediate_size=16, prefix_dense_intermediate_size=64, num_shared_experts=1,
              mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4,
              layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
))
