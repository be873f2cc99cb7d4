"""HC-SMoE (Chen et al. 2025, "Retraining-Free Merging of Sparse MoE via Hierarchical Clustering",
github.com/wazenmai/HC-SMoE): per layer, cluster the experts by what they output and merge each
cluster into one expert.

1. Feature of expert e: its output averaged over calibration tokens. The reference feeds EVERY token
   entering the MoE layer to EVERY expert, routed or not (`hcsmoe/merging/grouping_qwen.py`,
   `group_experts_by_clustering_output`: `experts[i](layer_input).mean(dim=0)`), so the feature
   describes the expert's function, not the tokens the router happened to send it; moepress does the
   same on the `SAMPLED_INPUTS` (512) token states sampled per layer at calibration
   (`LayerStats.out_mean`, the mean over ROUTED tokens only, is not this feature).
2. Average-linkage agglomerative clustering into E' = E − round(ratio·E) clusters per layer
   (`merging.agglomerate`), on the Euclidean distance between the features, as the reference code
   computes it (`hcsmoe/merging/clustering.py`: `pairwise_distances` is Euclidean, `compute_distance`
   the mean pairwise distance between two clusters, `--linkage average`). `distance="cosine"` (the
   default before issue 24) compares directions only; `linkage="single"|"complete"`;
   `max_cluster_size=N` never joins past N members (raised by one where no join fits).
   Why Euclidean: Euclidean average linkage gathers the experts whose mean output is SMALL into one
   big cluster (13–17 of 64 experts per layer on dsv2-mini at ratio 0.25, 31–33 at 0.5: the
   "collapse" HC-SMoE issue #2 reports for Qwen3), and merging experts that add little costs
   little. Cosine ignores output size: its clusters (≤ 7 members at 0.25) merge as badly as random
   clusters of the same sizes, and its merged models lost to random pruning; bounding the size does
   not help either (`bench/hc_smoe_diagnosis.py`, docs/methods.md).
3. Each cluster is merged by frequency-weighted averaging of its members' gate/up/down weights
   (the reference's `--merge freq`: coefficient = routed-slot count share, `LayerStats.frequency`,
   normalised over the cluster; equal shares for a cluster of never-routed experts). No neuron
   alignment, as the reference.
4. Router: the reference keeps all E router rows and points every member at the merged weights, so
   the checkpoint does not shrink its router and a token may pick the same merged expert twice (the
   two weights add up on it). That is moepress's default, `router="all-rows"`: E router rows, E'
   experts stored once, a map from router row to merged expert (moepress's own checkpoint format).
   `router="representative"` writes E' experts and E' router rows: the merged expert keeps the row of
   its most frequently routed member (ties: lower id), and the output is the source architecture.
   Also tried: the frequency-weighted average of the
   members' rows (same coefficients as the weights). It was worse on both mini checkpoints tried
   (dev perplexity, 16 × 256 held-out tokens, calibration 16 × 256): olmoe-mini 111.6 vs 114.6 at
   ratio 0.25 and 173.6 vs 186.4 at 0.5 (original 83.2); qwen2moe-mini 93.0 vs 93.9 and 122.5 vs
   129.5 (original 82.2) — and it would need a new tensor per merged expert in the plan. An averaged
   row scores every token for the merged expert somewhere between its members, blurring the routing
   the most used member's row was trained for.
"""

from __future__ import annotations

from typing import Literal

import torch

from moepress.calibrate.stats import CalibrationStats
from moepress.errors import MoepressError
from moepress.methods.base import Selection, floats, register_method
from moepress.methods.merging import (
    LINKAGES,
    SAMPLED_INPUTS,
    agglomerate,
    check_inputs,
    check_router,
    cosine_distance,
    euclidean_distance,
    kept_count,
    mean_outputs,
    merged_experts,
    selection,
)
from moepress.models.base import MoEBlock
from moepress.progress import progress

DISTANCES = {"cosine": cosine_distance, "euclidean": euclidean_distance}


def most_frequent(frequency: torch.Tensor, group: list[int]) -> int:
    return min(group, key=lambda e: (-float(frequency[e]), e))


@register_method("hc-smoe", layer_inputs=SAMPLED_INPUTS)
def hc_smoe(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks: dict[int, MoEBlock] | None = None,
    moe_inputs: dict[int, torch.Tensor] | None = None,
    distance: Literal["cosine", "euclidean"] = "euclidean",
    router: Literal["all-rows", "representative"] = "all-rows",
    linkage: Literal["average", "single", "complete"] = "average",
    max_cluster_size: int = 0,
) -> Selection:
    """Cluster each layer's experts by mean output (average linkage) into E·(1−ratio) merged experts."""
    if distance not in DISTANCES:
        raise MoepressError(f"distance must be one of {', '.join(DISTANCES)} (got {distance!r})")
    if linkage not in LINKAGES:
        raise MoepressError(f"linkage must be one of {', '.join(LINKAGES)} (got {linkage!r})")
    if isinstance(max_cluster_size, bool) or not isinstance(max_cluster_size, int) or max_cluster_size < 0:
        raise MoepressError(f"max_cluster_size must be a non-negative integer, 0: no bound (got {max_cluster_size!r})")
    check_inputs("hc-smoe", stats, blocks, moe_inputs)
    check_router("hc-smoe", router, blocks)
    groups, reps, merges, scores = {}, {}, {}, {}
    for i in progress(sorted(stats.layers), "hc-smoe: clustering experts"):
        s = stats[i]
        n_keep = kept_count(s, ratio)
        features = mean_outputs(blocks[i], moe_inputs[i])
        groups[i] = agglomerate(DISTANCES[distance](features), n_keep, linkage, max_cluster_size or None)
        reps[i] = [most_frequent(s.frequency, g) for g in groups[i]]
        merges[i] = merged_experts(groups[i], reps[i], s.frequency)
        scores[i] = floats(s.frequency)
    return selection(
        groups, reps, merges, scores,
        score_name="access frequency (share of routed token slots): merge coefficient and representative choice",
        router=router,
    )
