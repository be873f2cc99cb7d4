"""Beam (`beam`): DeepSeek-V3-style routing on sliding/full-attention layers.

Quirks spelled out here:
- Router logits in float32 (float32 router weight), sigmoid scores; `e_score_correction_bias` (on the
  router) is added for the CHOICE only; group-limited choice over `n_group` groups scored by the sum
  of their top-2 biased scores, best `topk_group` groups kept; weights are the unbiased scores of the
  chosen experts, renormalised (+1e-20) when `norm_topk_prob`.
- `routed_scaling_factor` multiplies the SUMMED routed output in the block (after aggregation), not
  the weights: the same value as scaling each weight, up to rounding.
- No shared experts. `mlp_layer_types` marks dense (`"dense"`) and MoE (`"sparse"`) layers.
- Experts' `_apply_gate` runs the activation in float32 (TransformersExperts calls the module itself).
"""

from __future__ import annotations

import dataclasses

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


@dataclasses.dataclass
class BeamBlock(MoEBlock):
    """The scaling factor is an attribute of the block (`BeamMoE.routed_scaling_factor`), not the router."""

    def __post_init__(self):
        self.routing = dataclasses.replace(self.routing, scaling=float(self.module.routed_scaling_factor))


def beam_routing(router, config) -> Routing:
    return Routing(
        scoring="sigmoid",
        top_k=router.top_k,
        norm_topk=bool(router.norm_topk_prob),
        n_group=router.num_group,
        topk_group=router.topk_group,
        group_score="top2sum",
        norm_eps=1e-20,
    )


declare(Family(
    name="beam",
    since="5.21",
    model_types=("beam",),
    routing=beam_routing,
    correction_bias="e_score_correction_bias",
    block_cls=BeamBlock,
    tiny=dict(mlp_layer_types=["dense", "sparse", "sparse"]),
))
