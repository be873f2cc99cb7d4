"""Frequency baseline: remove each layer's least frequently routed experts (no novices).

Frequency is the share of routed token slots that pick the expert (`LayerStats.frequency`), a usage
count. Ties (e.g. several never-routed experts) go by lower mean router weight, then lower expert id.

This is moepress's own baseline, not the MoNE paper's RS (`rs`, rs.py): RS scores an expert by its
mean gate WEIGHT over all tokens, not by how often it is picked, and prunes against ONE threshold over
all layers, not the same count per layer.
"""

from __future__ import annotations

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, choose_uniform, floats, register_method


@register_method("frequency")
def frequency(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
) -> Selection:
    """Prune round(ratio × E) least-used experts per layer."""
    scores = {i: floats(stats[i].frequency) for i in sorted(stats.layers)}
    weights = {i: floats(stats[i].mean_weight_all_tokens) for i in scores}
    keys = {i: list(zip(scores[i], weights[i], strict=True)) for i in scores}
    return Selection(
        pruned=choose_uniform(stats, ratio, keys),
        scores=scores,
        score_name="access frequency (share of routed token slots); lowest pruned first",
    )
