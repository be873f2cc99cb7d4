"""MoNE (Zhang et al. 2025, arXiv 2507.00390): prune redundant experts and replace each with a
*novice*, a constant vector equal to the expert's mean output over the calibration tokens routed to
it. The router keeps the novice's row, so every token is routed exactly as before; a token sent to a
novice gets `weight × mean output` instead of `weight × expert(x)`.

Redundancy from two per-expert metrics of each layer:

- access frequency f: the share of routed token slots that pick the expert
  (`LayerStats.frequency`, sums to 1 over a layer). `frequency_metric="weight"` uses instead the
  mean router weight over all tokens (`LayerStats.mean_weight_all_tokens`), which is what the
  reference code (github.com/zxgx/mode-pd) accumulates as its "routing score";
- output variance v: over the tokens routed to the expert, the variance of each hidden dimension
  of its unweighted output, averaged over the H hidden dimensions, i.e. trace(Cov)/H
  (`LayerStats.output_variance`; population variance, 0 for an expert routed to once or never).
  The paper and reference code use ‖per-dimension std‖₂ = sqrt(trace(Cov)), a monotone function
  of v; the exponent it implies is absorbed by the fusion weight below.

Normalisation, within each layer: each metric is divided by its layer maximum (f̂ = f / max f,
v̂ = v / max v, both in [0, 1]). The reference code normalises nothing (its scores are only compared
within a layer, where a positive per-layer scale changes no ranking); we need a per-layer scale for
`allocation="global"`, and dividing by the max is the one that keeps 0 meaning "contributes
nothing" and keeps ratios intact, which the product below needs. Min-max would send each layer's
least-used expert to 0 whatever its variance, and the product would then prune it unconditionally.

Fusion: importance = f̂^α · v̂^(1−α) with α = `fusion_weight` (redundancy = low importance; the
least important are pruned). The reference code fuses by a product too (its weight only scales the
product). A product, not a sum, because replacing an expert by its mean is harmless when EITHER it
is rarely used OR its output barely varies: the squared error a novice adds over the calibration
set is Σ_routed w²‖y − ȳ‖² ≈ E[w²] · count · H · v, i.e. proportional to f · v. Hence the default
α = 0.5, which ranks experts exactly by f · v, the estimated error of the novice; the reference
code's f · sqrt(v) corresponds to α = 2/3. α = 1 is frequency only, α = 0 variance only (the two
ablations in `mone_ablations.py`). An expert whose output is constant has v = 0 and goes first; its
novice reproduces it exactly.

Never-routed experts (f = 0, v = 0) are pruned first and become zero novices (their out_mean is 0):
the router row stays, so the other experts' weights are unchanged, and they add nothing, as before.
Ties are broken by lower frequency, then lower variance, then lower expert id.
"""

from __future__ import annotations

from typing import Literal

import torch

from moepress.calibrate.stats import CalibrationStats, LayerStats
from moepress.errors import MoepressError
from moepress.methods.base import Selection, choose_global, choose_uniform, floats, register_method

ALLOCATIONS = ("uniform", "global")
FREQUENCY_METRICS = ("count", "weight")


def _normalised(t: torch.Tensor) -> torch.Tensor:
    top = t.max()
    return t / top if top > 0 else torch.zeros_like(t)


def layer_metrics(s: LayerStats, frequency_metric: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
    """(access frequency, output variance) per expert of one layer, float64."""
    freq = s.frequency if frequency_metric == "count" else s.mean_weight_all_tokens
    return freq.double(), s.output_variance.double()


def importance(freq: torch.Tensor, var: torch.Tensor, fusion_weight: float) -> torch.Tensor:
    """f̂^α · v̂^(1−α) with each metric divided by its layer max; 0 ** 0 is 1, so α ∈ {0, 1} is exact."""
    return _normalised(freq).pow(fusion_weight) * _normalised(var).pow(1 - fusion_weight)


def mone_selection(
    stats: CalibrationStats,
    ratio: float,
    *,
    fusion_weight: float,
    allocation: str,
    novices: bool,
    frequency_metric: str = "count",
) -> Selection:
    """The MoNE decision for any fusion weight; shared by `mone` and its single-metric ablations."""
    number = isinstance(fusion_weight, int | float) and not isinstance(fusion_weight, bool)
    if not number or not 0 <= fusion_weight <= 1:
        raise MoepressError(f"fusion_weight must be in [0, 1] (got {fusion_weight!r}); the default is 0.5")
    if allocation not in ALLOCATIONS:
        raise MoepressError(f"allocation must be one of {', '.join(ALLOCATIONS)} (got {allocation!r})")
    if frequency_metric not in FREQUENCY_METRICS:
        raise MoepressError(
            f"frequency_metric must be one of {', '.join(FREQUENCY_METRICS)} (got {frequency_metric!r})"
        )
    if not isinstance(novices, bool):
        raise MoepressError(f"novices must be true or false (got {novices!r})")
    scores, freqs, variances, keys = {}, {}, {}, {}
    for i in sorted(stats.layers):
        f, v = layer_metrics(stats[i], frequency_metric)
        imp = importance(f, v, float(fusion_weight))
        scores[i], freqs[i], variances[i] = floats(imp), floats(f), floats(v)
        keys[i] = list(zip(scores[i], freqs[i], variances[i], strict=True))
    choose = choose_uniform if allocation == "uniform" else choose_global
    return Selection(
        pruned=choose(stats, ratio, keys),
        scores=scores,
        score_name=f"importance f^{fusion_weight:g}·v^{1 - fusion_weight:g} (f, v divided by their layer "
        "max); lowest pruned first",
        novices=novices,
        metadata={
            "frequency": {str(i): x for i, x in freqs.items()},
            "output_variance": {str(i): x for i, x in variances.items()},
        },
    )


@register_method("mone")
def mone(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    fusion_weight: float = 0.5,
    allocation: Literal["uniform", "global"] = "uniform",
    novices: bool = True,
    frequency_metric: Literal["count", "weight"] = "count",
) -> Selection:
    """Replace the `ratio` least important experts of each layer (or of the model, with
    `allocation="global"`) by novices; `novices=False` is the plain-pruning ablation."""
    return mone_selection(
        stats, ratio, fusion_weight=fusion_weight, allocation=allocation, novices=novices,
        frequency_metric=frequency_metric,
    )
