"""REAP baseline (Lasby et al. 2025, "REAP the Experts"): remove the experts whose routed
contribution is smallest, no novices.

Score per expert = mean over the tokens routed to it of router weight × ‖expert output‖₂
(`LayerStats.reap_score`); never-routed experts score 0 and go first. Ties go by lower frequency,
then lower expert id.
"""

from __future__ import annotations

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, choose_uniform, floats, register_method


@register_method("reap")
def reap(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
) -> Selection:
    """Prune round(ratio × E) experts of lowest REAP score per layer."""
    scores = {i: floats(stats[i].reap_score) for i in sorted(stats.layers)}
    freqs = {i: floats(stats[i].frequency) for i in scores}
    keys = {i: list(zip(scores[i], freqs[i], strict=True)) for i in scores}
    return Selection(
        pruned=choose_uniform(stats, ratio, keys),
        scores=scores,
        score_name="REAP: mean over routed tokens of router weight × ‖expert output‖₂; lowest pruned first",
    )
