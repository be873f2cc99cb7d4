"""Inkling-2 text decoders: `inkling2_text` and its looped variant `inkling2_loop_text`.

Quirks spelled out here:
- Every decoder layer (sliding or full) has an MoE block `mlp` (router `gate`, experts `experts`).
- Routing in float32 (float32 router weight): `scoring_func` scores (sigmoid by default), the
  router's `e_score_correction_bias` added for the CHOICE only, top-k, weights = unbiased scores of
  the chosen experts renormalised (+1e-20), times `routed_scaling_factor` (`route_scale`).
- Expert count `n_routed_experts` (`num_local_experts` is an alias).
- Experts use a softcapped SwiGLU (`_apply_gate`) and accumulate in float32; TransformersExperts
  calls the module itself, so each expert's output is the family's.
"""

from __future__ import annotations

import torch

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def inkling2_routing(router, config) -> Routing:
    scoring = getattr(config, "scoring_func", "sigmoid")
    return Routing(
        scoring=scoring,
        top_k=router.top_k,
        norm_topk=True,
        scaling=float(router.routed_scaling_factor),
        norm_eps=1e-20,
    )


def hand_on_block_states(layer, kwargs: dict, hidden_in, output) -> dict:
    """Inkling-2's loop: a block-boundary layer appends the hidden states entering it to the block
    states every later layer reads (its attention and MLP inputs mix them)."""
    states = kwargs["block_states"]
    if getattr(layer, "is_block_boundary", False):
        states = torch.cat([states.to(hidden_in.device), hidden_in.unsqueeze(-2)], dim=-2)
    return {"block_states": states}


# the LM head has `unpadded_vocab_size` rows (padded to `vocab_size` on disk)
_TINY = dict(layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], unpadded_vocab_size=128)

# two families, each tested on its own tiny model; the loop variant came one transformers release later
for _name, _since in (("inkling2_text", "5.23"), ("inkling2_loop_text", "5.24")):
    declare(Family(
        name=_name,
        since=_since,
        model_types=(_name,),
        routing=inkling2_routing,
        num_experts_key="n_routed_experts",
        correction_bias="e_score_correction_bias",
        state_arguments=("block_states",),
        hand_on=hand_on_block_states,
        tiny=_TINY,
    ))
