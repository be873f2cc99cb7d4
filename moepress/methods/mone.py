"""MoNE (Zhang et al. 2025, arXiv 2507.00390): prune redundant experts and replace each with a
*novice*, a constant vector equal to the expert's mean output over the calibration tokens routed to
it. The router keeps the novice's row, so every token is routed exactly as before; a token sent to a
novice gets `weight × mean output` instead of `weight × expert(x)`.

By default `mone` computes what the paper's reference code computes (github.com/zxgx/mode-pd,
`modepd/pruning/expert_prune.py` `expert_prune_by_mone`, "EP" below; paper configuration
`scripts/expert_prune/mone-layer-rs-out-fusion.sh`: `--mone_ranking_metric fusion
--expert_ranking_scope layer`, `fusion_io_weight` 0.5), step by step:

1. Routing score r (EP L507-542, gate hook): the post-top-k gate weight each token gives the expert
   (0 where it is not routed), averaged over ALL tokens: `LayerStats.mean_weight_all_tokens`.
   (The reference divides by #sequences for DeepSeek, #tokens for OLMoE: one constant per layer,
   and the same for every layer, so no ranking changes.) The weights are the ones the model applies
   (`MoEBlock.route`: renormalised when the config's `norm_topk_prob` is true). The reference's OLMoE
   gate hook recomputes them from the router logits as softmax then top-k and never renormalises, even
   when `norm_topk_prob` is true; the two agree where it is false (OLMoE-1B-7B, the bundled
   olmoe-mini) and differ, by a per-token factor, where it is true.
2. Output fluctuation o (EP L457-503 expert hook, reduced at EP L606): per hidden dimension, the
   variance of the expert's UNWEIGHTED output over the tokens routed to it; o = ‖sqrt(var)‖₂ =
   sqrt(Σ_d var_d) = sqrt(trace Cov). From `LayerStats.out_m2 / count`; 0 for a never-routed expert.
   Ours is the exact population variance, accumulated in float64 (Chan's merge). The reference's
   running update (EP L475-480) differs from it in two ways: it skips each expert's first batch
   (`if num_tokens > 0`: the first batch's deviations are never added), and it measures each later
   batch's deviations from the running mean at that time (already updated with that batch), never
   correcting the earlier batches' sums when the mean moves. For 2 tokens in 2 batches it gets
   (y2−y1)²/8 where the population variance is (y2−y1)²/4. The shortfall is of order the expert's
   first-batch share of its tokens, not 1/(tokens per expert): small for an expert that gets tokens
   in every batch, 7–36% low for rare OLMoE experts. In the ranking it flips at most one near-tied
   pair at the keep/prune boundary per layer, in 1–2 layers.
3. Fusion (EP L602-607): metric = (a·o)·((1−a)·r) with a = `fusion_weight` = 0.5. No normalisation:
   a only scales, so experts rank by r · sqrt(trace Cov); higher = more important. The plan's scores
   are these metric values.
4. Allocation (EP L633-645, scope "layer"): exactly E − round(ratio·E) experts kept per MoE layer
   (48 or 32 of 64 at ratio 0.25 / 0.5); the others, lowest metric first, become novices. The
   reference keeps metric > sorted_desc[preserve_n], so ties at the threshold would all go; here
   ties go by lower r, then lower o, then lower expert id. `allocation="global"` is the reference's
   "model" scope (EP L627-631): one threshold over the raw metrics of all layers
   (`rs.choose_global_threshold`; every layer keeps at least top_k full experts).
5. Novices (EP L641-662): each pruned expert becomes `approx_value` = its mean unweighted output over
   its routed calibration tokens (`LayerStats.out_mean`), router row kept. `novices="zero"` is the
   reference's `--zero_out_novice` (EP L659-661): the novice vector is 0 (the paper's "w/o novice"
   ablation); `novices=False` (moepress's own ablation) removes the experts' router rows instead, so
   the softmax renormalises and tokens re-route: a different experiment.

Single-metric rankings, with novices (the paper's ablations, also registered as `mone-variance` and
`mone-frequency` in mone_ablations.py): `ranking="output_fluctuation"` ranks by ‖var‖₂ (EP L597-601:
`torch.norm(fluc)`, the L2 norm of the per-dimension variance vector, not the trace) and
`ranking="routing_score"` by r alone (EP L594-596).

`ranking="mse"` is moepress's earlier variant (kept for comparison): count frequency f (share of top-k
slots, `LayerStats.frequency`) and v = trace(Cov)/H (`LayerStats.output_variance`), each divided by
its layer max (which keeps 0 meaning "contributes nothing" and makes layers comparable for
`allocation="global"`), importance = f̂^α · v̂^(1−α), α = `fusion_weight`. Rationale: the squared error
a novice adds over the calibration set is Σ_routed w²‖y − ȳ‖² ≈ E[w²] · count · H · v, proportional
to f · v, which α = 0.5 ranks by exactly (the reference's r · sqrt(trace Cov) is α = 2/3 in this form,
with gate-weight frequency). α = 1 is frequency only, α = 0 variance only (the `frequency+novice` and
`variance` methods). Its global allocation uses `choose_global` (normalised keys, top_k caps).

`frequency_metric` picks the frequency behind r (or f): "weight" (mean gate weight over all tokens,
the reference) or "count"; left unset it is "weight", except "count" under `ranking="mse"`; the plan
records the resolved value. Never-routed experts score 0 under every ranking and go first; their
novice is 0 (out_mean of no tokens), so keeping their router row changes nothing.
"""

from __future__ import annotations

from typing import Literal

import torch

from moepress.calibrate.stats import CalibrationStats, LayerStats
from moepress.errors import MoepressError
from moepress.methods.base import Selection, choose_global, choose_uniform, floats, register_method
from moepress.methods.rs import choose_global_threshold

RANKINGS = ("fusion", "output_fluctuation", "routing_score", "mse")
ALLOCATIONS = ("uniform", "global")
FREQUENCY_METRICS = ("count", "weight")


def _normalised(t: torch.Tensor) -> torch.Tensor:
    top = t.max()
    return t / top if top > 0 else torch.zeros_like(t)


def routing_frequency(s: LayerStats, frequency_metric: str = "weight") -> torch.Tensor:
    """Per expert, float64: mean gate weight over all tokens ("weight") or share of top-k slots ("count")."""
    return (s.frequency if frequency_metric == "count" else s.mean_weight_all_tokens).double()


def output_variance_per_dim(s: LayerStats) -> torch.Tensor:
    """[E, H] float64: per hidden dimension, the population variance of each expert's unweighted
    output over its routed tokens (0 for never-routed experts)."""
    return s.out_m2.double() / s.count.double().clamp(min=1)[:, None] * (s.count > 0)[:, None]


def output_fluctuation(s: LayerStats) -> torch.Tensor:
    """The reference's fusion term ‖sqrt(var)‖₂ = sqrt(trace Cov) per expert (EP L606)."""
    return output_variance_per_dim(s).sum(-1).sqrt()


def variance_norm(s: LayerStats) -> torch.Tensor:
    """The reference's variance-only metric ‖var‖₂, the L2 norm of the per-dimension variances (EP L600)."""
    return output_variance_per_dim(s).norm(dim=-1)


def layer_metrics(s: LayerStats, frequency_metric: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
    """`ranking="mse"`'s (frequency, trace(Cov)/H) per expert of one layer, float64."""
    return routing_frequency(s, frequency_metric), s.output_variance.double()


def importance(freq: torch.Tensor, var: torch.Tensor, fusion_weight: float) -> torch.Tensor:
    """f̂^α · v̂^(1−α) with each metric divided by its layer max; 0 ** 0 is 1, so α ∈ {0, 1} is exact."""
    return _normalised(freq).pow(fusion_weight) * _normalised(var).pow(1 - fusion_weight)


def _check(ranking, fusion_weight, allocation, novices, frequency_metric) -> None:
    if ranking not in RANKINGS:
        raise MoepressError(f"ranking must be one of {', '.join(RANKINGS)} (got {ranking!r})")
    number = isinstance(fusion_weight, int | float) and not isinstance(fusion_weight, bool)
    if not number or not 0 <= fusion_weight <= 1:
        raise MoepressError(f"fusion_weight must be in [0, 1] (got {fusion_weight!r}); the default is 0.5")
    if ranking == "fusion" and fusion_weight in (0, 1):
        raise MoepressError(
            f"fusion_weight={fusion_weight} zeroes every score under ranking=fusion, whose metric is "
            "(a·fluctuation)·((1−a)·routing score) (a only scales it); rank by one metric with "
            "ranking=output_fluctuation or ranking=routing_score, or use ranking=mse"
        )
    if allocation not in ALLOCATIONS:
        raise MoepressError(f"allocation must be one of {', '.join(ALLOCATIONS)} (got {allocation!r})")
    if frequency_metric not in FREQUENCY_METRICS:
        raise MoepressError(
            f"frequency_metric must be one of {', '.join(FREQUENCY_METRICS)} (got {frequency_metric!r})"
        )
    if not (isinstance(novices, bool) or novices == "zero"):
        raise MoepressError(f"novices must be true, false or zero (got {novices!r})")


def mone_selection(
    stats: CalibrationStats,
    ratio: float,
    *,
    fusion_weight: float = 0.5,
    allocation: str = "uniform",
    novices: bool | str = True,
    frequency_metric: str | None = None,
    ranking: str = "fusion",
) -> Selection:
    """The MoNE decision for every ranking; shared by `mone` and its ablations. Records the resolved
    `frequency_metric` in `Selection.hyperparameters`."""
    if frequency_metric is None:
        frequency_metric = "count" if ranking == "mse" else "weight"
    _check(ranking, fusion_weight, allocation, novices, frequency_metric)
    a = float(fusion_weight)
    scores, keys, meta = {}, {}, {"frequency": {}}
    for i in sorted(stats.layers):
        s = stats[i]
        r = routing_frequency(s, frequency_metric)
        if ranking == "mse":
            v = s.output_variance.double()
            metric, tiebreak, name = importance(r, v, a), [r, v], "output_variance"
        elif ranking == "fusion":
            v = output_fluctuation(s)
            metric, tiebreak, name = (a * v) * ((1 - a) * r), [r, v], "output_fluctuation"
        elif ranking == "output_fluctuation":
            v = variance_norm(s)
            metric, tiebreak, name = v, [r], "output_variance_norm"
        else:  # routing_score
            v = output_fluctuation(s)
            metric, tiebreak, name = r, [v], "output_fluctuation"
        scores[i] = floats(metric)
        keys[i] = list(zip(scores[i], *(floats(t) for t in tiebreak), strict=True))
        meta["frequency"][str(i)] = floats(r)
        meta.setdefault(name, {})[str(i)] = floats(v)
    if allocation == "uniform":
        pruned = choose_uniform(stats, ratio, keys)
    elif ranking == "mse":
        pruned = choose_global(stats, ratio, keys)
    else:
        pruned = choose_global_threshold(stats, ratio, scores)
    freq_name = "mean gate weight" if frequency_metric == "weight" else "count frequency"
    score_name = {
        "fusion": f"(a·sqrt(trace Cov))·((1−a)·{freq_name}), a={a:g}",
        "output_fluctuation": "L2 norm of the per-dimension output variance",
        "routing_score": freq_name,
        "mse": f"importance f^{a:g}·v^{1 - a:g} (f = {freq_name}, v = trace(Cov)/H, each divided by its "
        "layer max)",
    }[ranking]
    return Selection(
        pruned=pruned,
        scores=scores,
        score_name=score_name + "; lowest pruned first",
        novices=novices is not False,
        zero_novices=novices == "zero",
        metadata=meta,
        hyperparameters={"frequency_metric": frequency_metric},
    )


@register_method("mone")
def mone(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    ranking: Literal["fusion", "output_fluctuation", "routing_score", "mse"] = "fusion",
    fusion_weight: float = 0.5,
    allocation: Literal["uniform", "global"] = "uniform",
    novices: bool | Literal["zero"] = True,
    frequency_metric: Literal["count", "weight"] | None = None,
) -> Selection:
    """Replace the `ratio` least important experts of each layer (or of the model, with
    `allocation="global"`) by novices, ranked as the reference code does (`ranking="mse"`: moepress's
    variant); `novices="zero"` zeroes the novices, `novices=False` removes the experts instead."""
    return mone_selection(
        stats, ratio, ranking=ranking, fusion_weight=fusion_weight, allocation=allocation, novices=novices,
        frequency_metric=frequency_metric,
    )
