"""M-SMoE (Li et al. 2024, "Merge, Then Compress", github.com/UNITES-Lab/MC-SMoE): the merging step
of MC-SMoE, without its low-rank compression.

1. Dominant experts: the E' = E − round(ratio·E) most frequently routed experts of each layer
   (`LayerStats.frequency`, routed-slot share; ties: lower id). The reference allots E' per layer from
   one global frequency threshold; moepress keeps E' equal in every layer so that the output stays the
   source architecture.
2. Grouping: every other expert joins the dominant expert whose router logits it resembles most —
   cosine similarity between two experts' logit columns over calibration tokens
   (`grouping_mixtral.py` `_compute_all_similarities_by_router_logits`, `similarity_base="router-logits"`),
   here over the `SAMPLED_INPUTS` (512) token states sampled per layer.
3. Alignment (`align=True`): before averaging, each member's intermediate neurons are permuted to
   match the dominant expert's by weight matching: maximise Σ_a ⟨centre neuron a, member neuron p[a]⟩
   over permutations p, a neuron being its gate row, up row and down column (the reference's
   `compute_switch_permutation_by_weight_matching` with `include_wo=True`, gate and up both counted
   for a gated MLP), solved exactly by the Hungarian algorithm (scipy's `linear_sum_assignment`, as
   the reference; a greedy matching would not recover an exactly permuted copy).
4. Merge: frequency-weighted average of the aligned weights (`merge_by_groups_with_usage_weighted`).
   Router (`router="all-rows"`, the default, as the reference): every member keeps its router row and
   routes to the merged expert; `router="representative"`: the merged expert keeps the dominant
   expert's row only.
"""

from __future__ import annotations

import torch

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, floats, register_method
from moepress.methods.merging import (
    SAMPLED_INPUTS,
    check_inputs,
    check_router,
    cosine_distance,
    kept_count,
    match_neurons,
    merged_experts,
    nearest_centre,
    neuron_features,
    router_logits,
    selection,
)
from moepress.models.base import MoEBlock
from moepress.progress import progress


def weight_matching(block: MoEBlock):
    """`permutation(centre, member)` aligning the member's neurons to the centre's by weight matching."""

    @torch.no_grad()
    def permutation(centre: int, member: int) -> torch.Tensor:
        return match_neurons(-(neuron_features(block, centre) @ neuron_features(block, member).T))

    return permutation


@register_method("m-smoe", layer_inputs=SAMPLED_INPUTS)
def m_smoe(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks: dict[int, MoEBlock] | None = None,
    moe_inputs: dict[int, torch.Tensor] | None = None,
    align: bool = True,
    router: str = "all-rows",
) -> Selection:
    """Merge each layer into its E·(1−ratio) most used experts, grouped by router-logit similarity."""
    check_inputs("m-smoe", stats, blocks, moe_inputs)
    check_router("m-smoe", router, blocks)
    groups, reps, merges, scores = {}, {}, {}, {}
    for i in progress(sorted(stats.layers), "m-smoe: merging experts"):
        s = stats[i]
        freq = s.frequency
        dominant = sorted(range(s.num_experts), key=lambda e: (-float(freq[e]), e))[: kept_count(s, ratio)]
        similarity = 1 - cosine_distance(router_logits(blocks[i], moe_inputs[i]).T)
        groups[i] = nearest_centre(similarity, dominant)
        reps[i] = dominant
        merges[i] = merged_experts(groups[i], reps[i], freq, weight_matching(blocks[i]) if align else None)
        scores[i] = floats(freq)
    return selection(
        groups, reps, merges, scores,
        score_name="access frequency (share of routed token slots): the most used experts are the centres",
        router=router,
    )
