"""RS ("routing score"), the expert-pruning baseline of the MoNE paper, as its reference code runs it
(github.com/zxgx/mode-pd, `modepd/pruning/expert_prune.py` `expert_prune_by_routing_score`, L16-156,
script `scripts/expert_prune/routing_score-model.sh`).

- Score (EP L52-75, gate hook): the post-top-k gate weight each token gives the expert (0 where it is not routed),
  averaged over ALL calibration tokens: `LayerStats.mean_weight_all_tokens`.
- Allocation (EP L115-120, `--expert_ranking_scope model`): ONE threshold over the raw scores of every
  MoE layer, `threshold = sorted_desc[ceil(L · preserve_n)]`, keep the experts scoring above it, so the
  model keeps L · preserve_n experts in all, distributed wherever the scores are high. preserve_n is
  the per-layer count the ratio means: E − round(ratio · E) (`experts_to_prune`). A layer left with
  nothing gets its best expert back (EP L123-127); moepress tops a layer up to `top_k` experts, as
  fewer cannot route top-k (the reference would fail in `torch.topk` there; with top_k = 1 the two
  rules agree). `allocation="uniform"` is the reference's `--expert_ranking_scope layer` (EP L103-114).
- Surgery (EP L130-152): pruned experts leave the router too (its rows are sliced; the softmax then
  renormalises over the rest), no novices.

The scores are raw, not normalised per layer, as in the reference (which thresholds the sums over
tokens, L116: the same token count divides every layer, so the order is that of the means).
The reference keeps strictly-above-threshold experts, so ties at the threshold are all pruned; here
exactly the computed count is kept and ties go by lower expert id (then lower layer) pruned first.
`frequency` (frequency.py) is moepress's own, different baseline: count frequency, uniform per layer.
"""

from __future__ import annotations

from typing import Literal

from moepress.calibrate.stats import CalibrationStats
from moepress.errors import MoepressError
from moepress.methods.base import Selection, choose_uniform, experts_to_prune, floats, register_method


def choose_global_threshold(
    stats: CalibrationStats, ratio: float, metrics: dict[int, list[float]]
) -> dict[int, list[int]]:
    """The reference code's model-scope choice (EP L115-127, L627-631): keep the Σ_layers
    (E − round(ratio · E)) highest raw `metrics` over all layers (higher = more important), then give
    back to any layer left with fewer than its top_k (at least 1) experts its best pruned ones.
    Returns the pruned experts of each layer."""
    layers = sorted(stats.layers)
    keep_total = 0
    for i in layers:
        s = stats[i]
        keep_total += s.num_experts - experts_to_prune(s.num_experts, s.top_k, ratio)
    # ascending = pruned first; ties: lower expert id, then lower layer, pruned first
    order = sorted((m, e, i) for i in layers for e, m in enumerate(metrics[i]))
    n_prune = len(order) - keep_total
    pruned = {i: [] for i in layers}
    kept = {i: [] for i in layers}
    for rank, (_, e, i) in enumerate(order):
        (pruned if rank < n_prune else kept)[i].append(e)
    for i in layers:
        floor = max(1, stats[i].top_k)
        while len(kept[i]) < floor:  # pruned[i] is ascending: its last is the layer's best pruned
            kept[i].append(pruned[i].pop())
    return {i: sorted(v) for i, v in pruned.items()}


@register_method("rs")
def rs(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    allocation: Literal["global", "uniform"] = "global",
) -> Selection:
    """Remove the experts of lowest mean gate weight: one threshold over the whole model (default), or
    round(ratio × E) per layer with `allocation="uniform"`."""
    if allocation not in ("global", "uniform"):
        raise MoepressError(f"allocation must be one of global, uniform (got {allocation!r})")
    scores = {i: floats(stats[i].mean_weight_all_tokens) for i in sorted(stats.layers)}
    if allocation == "global":
        pruned = choose_global_threshold(stats, ratio, scores)
    else:
        pruned = choose_uniform(stats, ratio, {i: [(v,) for v in s] for i, s in scores.items()})
    return Selection(
        pruned=pruned,
        scores=scores,
        score_name="routing score: mean post-top-k gate weight over all tokens (raw); lowest pruned first"
        + (", one threshold over all layers" if allocation == "global" else ""),
    )
