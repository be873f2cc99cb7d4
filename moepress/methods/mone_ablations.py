"""The two single-metric ablations of MoNE (its paper's Figure 4): rank experts by output variance
only, or by access frequency only, and still replace the pruned ones with novices. They are MoNE
with the fusion weight pinned to 0 or 1, so any difference to `mone` is the other metric's doing.
"""

from __future__ import annotations

from typing import Literal

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, register_method
from moepress.methods.mone import mone_selection


@register_method("variance")
def variance(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    allocation: Literal["uniform", "global"] = "uniform",
) -> Selection:
    """Novices for the experts of lowest output variance (MoNE with fusion_weight = 0)."""
    sel = mone_selection(stats, ratio, fusion_weight=0.0, allocation=allocation, novices=True)
    sel.hyperparameters = {"fusion_weight": 0.0, "novices": True}
    return sel


@register_method("frequency+novice")
def frequency_novice(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    allocation: Literal["uniform", "global"] = "uniform",
) -> Selection:
    """Novices for the least frequently routed experts (MoNE with fusion_weight = 1)."""
    sel = mone_selection(stats, ratio, fusion_weight=1.0, allocation=allocation, novices=True)
    sel.hyperparameters = {"fusion_weight": 1.0, "novices": True}
    return sel
