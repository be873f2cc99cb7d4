"""Random baseline: remove round(ratio × E) experts per layer chosen uniformly at random (no
novices), the floor any informed method must clear.

Each layer draws from its own generator seeded with (seed, layer), so a layer's choice depends only
on the seed and its index, not on which other layers the statistics hold.
"""

from __future__ import annotations

import torch

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, choose_uniform, floats, register_method


def _priorities(seed: int, layer: int, num_experts: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(num_experts, generator=g, dtype=torch.float64)


@register_method("random")
def random(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
) -> Selection:
    """Prune the experts with the lowest seeded uniform draw in each layer."""
    scores = {i: floats(_priorities(seed, i, stats[i].num_experts)) for i in sorted(stats.layers)}
    keys = {i: [(s,) for s in v] for i, v in scores.items()}
    return Selection(
        pruned=choose_uniform(stats, ratio, keys),
        scores=scores,
        score_name="seeded uniform draw; lowest pruned first",
    )
