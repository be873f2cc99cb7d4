"""MoNE's ablations: the paper's three, as its reference code runs them, and moepress's two variants.

The paper's (github.com/zxgx/mode-pd, `modepd/pruning/expert_prune.py` "EP"; each at
`--expert_ranking_scope layer`), all `mone` with one setting changed, so any difference to `mone` is
that setting's doing:
- `mone-zero-novice` ("w/o novice", `scripts/expert_prune/mone-novice.sh`, `--zero_out_novice`,
  EP L659-661): the fusion ranking, and each pruned expert keeps its router row but outputs 0. Routing
  and the other experts' weights are unchanged; the pruned expert's share of the output is lost.
- `mone-variance` ("output fluctuation only", `mone-out.sh`, EP L597-601): rank by ‖var‖₂, the L2 norm
  of the per-dimension variance vector of the unweighted output (not its trace), novices as usual.
- `mone-frequency` ("routing score only", `mone-rs.sh`, EP L594-596): rank by the mean post-top-k gate
  weight over all tokens, novices as usual.

moepress's variants, ablations of `mone --hp ranking=mse` (count frequency f and trace(Cov)/H, each
divided by its layer max, importance f̂^α·v̂^(1−α)) with α pinned:
- `variance` (α = 0): ranks by trace(Cov)/H, i.e. ‖var‖₁/H, where the paper uses ‖var‖₂;
- `frequency+novice` (α = 1): ranks by COUNT frequency (share of top-k slots), where the paper uses the
  mean gate weight.
`mone --hp novices=false` (pruned experts leave the router, tokens re-route) is moepress's own
"without novice" experiment, not the paper's zero novice.
"""

from __future__ import annotations

from typing import Literal

from moepress.calibrate.stats import CalibrationStats
from moepress.methods.base import Selection, register_method
from moepress.methods.mone import mone_selection


def _register_pinned(name: str, doc: str, **pinned) -> None:
    """Register `name` as MoNE with `pinned` hyperparameters; only `allocation` stays free. The
    pinned values are recorded in the plan, so it says exactly which ablation made it."""

    def method(
        stats: CalibrationStats,
        ratio: float,
        *,
        seed: int = 0,
        blocks=None,
        moe_inputs=None,
        allocation: Literal["uniform", "global"] = "uniform",
    ) -> Selection:
        sel = mone_selection(stats, ratio, allocation=allocation, **pinned)
        sel.hyperparameters = {**sel.hyperparameters, **pinned}
        return sel

    method.__name__ = method.__qualname__ = name.replace("-", "_").replace("+", "_")
    method.__doc__ = doc
    register_method(name)(method)


_register_pinned(
    "mone-zero-novice",
    'MoNE\'s ranking, novices replaced by zero vectors (router rows kept): the paper\'s "w/o novice".',
    ranking="fusion", fusion_weight=0.5, novices="zero",
)
_register_pinned(
    "mone-variance",
    "Novices for the experts of lowest ‖per-dimension output variance‖₂ (the paper's variance-only).",
    ranking="output_fluctuation", novices=True,
)
_register_pinned(
    "mone-frequency",
    "Novices for the experts of lowest mean gate weight (the paper's routing-score-only).",
    ranking="routing_score", novices=True,
)
_register_pinned(
    "variance",
    "Novices for the experts of lowest trace(Cov)/H (`mone --hp ranking=mse --hp fusion_weight=0`).",
    ranking="mse", fusion_weight=0.0, novices=True,
)
_register_pinned(
    "frequency+novice",
    "Novices for the least frequently routed experts by count (`mone --hp ranking=mse --hp fusion_weight=1`).",
    ranking="mse", fusion_weight=1.0, novices=True,
)
