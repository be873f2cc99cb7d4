"""ERNIE-4.5-MoE (`ernie4_5_moe`).

- Router logits in float32 (the router weight is kept in float32), softmax over all experts, top-k
  chosen on `softmax + e_score_correction_bias`, the chosen (uncorrected) probabilities renormalised
  with the denominator clamped from below at `moe_norm_min`, then cast to the activations' dtype.
- The correction bias lives in `gate.moe_statics.e_score_correction_bias`, shaped [1, E] (one
  "expert group"); the block view uses its row 0.
- Shared experts: one ungated MLP of `moe_num_shared_experts × moe_intermediate_size` rows, added.
- MoE layers: every `moe_layer_interval`-th layer from `moe_layer_start_index` to
  `moe_layer_end_index`; the others are dense.
"""

from __future__ import annotations

from dataclasses import dataclass

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


def ernie_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=True, norm_min=float(router.norm_min))


@dataclass
class ErnieBlock(MoEBlock):
    """Correction bias from `gate.moe_statics`; weights in the activations' dtype."""

    def __post_init__(self) -> None:
        if self.correction_bias is None:
            self.correction_bias = self.router.moe_statics.e_score_correction_bias[0]

    def route(self, x, active=None, logits=None):
        result = super().route(x, active, logits)
        if x is not None:
            result.weights = result.weights.to(x.dtype)
        return result


declare(Family(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    routing=ernie_routing,
    shared="shared_experts",
    block_cls=ErnieBlock,
    tiny=dict(moe_layer_start_index=1, moe_layer_end_index=2, moe_num_shared_experts=2),
))
