"""What every expert-pruning method shares: the registry, the ratio → expert-count rule, and the one
place where a method's decision becomes a `CompressionPlan`.

A method is a function `(stats, ratio, *, seed=0, blocks=None, moe_inputs=None, **hp) -> Selection`
registered under a name (a sequential method also takes `model_inputs`, see `register_method`).
`register_method` wraps it so that every method, called directly or through `get_method`, checks its
arguments the same way and returns a `CompressionPlan` that records the method, every hyperparameter
(defaults included, so a plan says exactly how it was made), the calibration data and model
fingerprints, and per-layer scores for the report.

Methods decide from statistics (and, for search and merging methods, the MoE blocks and sampled MoE
inputs; a sequential method re-runs the model); they never change weights and never branch on the
model family. A merging method's decision is per layer a list of `MergedExpert`s.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moepress.calibrate.stats import CalibrationStats
from moepress.errors import MoepressError
from moepress.models.base import MoEBlock
from moepress.plan import CompressionPlan, Keep, Merge, Prune

# Arguments every method takes; anything else a method declares is one of its hyperparameters.
COMMON_ARGS = ("stats", "ratio", "seed", "blocks", "moe_inputs")


@dataclass
class Selection:
    """What a method decided, before it becomes a plan.

    `pruned[layer]` lists the routed experts to remove (or to replace with novices when `novices`);
    `scores[layer]` holds one float per expert, lower meaning pruned sooner, described by
    `score_name`, so a report can plot why each expert went. `metadata` carries further per-layer
    lists (keyed by layer as a string, as JSON will store them); `hyperparameters` carries resolved
    settings the caller did not pass (e.g. which search NAEE ran). `zero_novices` (with `novices`)
    makes every novice vector 0: the router row stays, the output is dropped (MoNE's "w/o novice").
    """

    pruned: dict[int, list[int]]
    scores: dict[int, list[float]]
    score_name: str
    novices: bool = False
    zero_novices: bool = False  # novices output 0 (router row kept) instead of their mean output
    metadata: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    # merging methods: per layer, the merged experts (the representatives' router rows stay, the other
    # members' go: exactly `pruned[layer]`); singleton groups need no entry
    merges: dict[int, list[MergedExpert]] = field(default_factory=dict)
    # merging methods: "all" keeps every router row, the pruned members routing to their merged expert
    # (`Prune.router_rows`); "kept": only the kept experts' rows stay
    router_rows: str = "kept"


@dataclass
class MergedExpert:
    """One expert of a merged layer: Σ_j coefficients[j] · members[j]'s weights, each member's
    intermediate neurons first reordered by `permutations[member]` (absent: as stored); the
    `representative` (a member) keeps its router row."""

    representative: int
    members: list[int]
    coefficients: list[float]
    permutations: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ModelInputs:
    """What a sequential method needs to re-run the model layer by layer: the loaded model, the
    calibration token ids the statistics came from, and how to batch and place them."""

    model: nn.Module
    input_ids: torch.Tensor
    batch_size: int = 8
    device: torch.device | str | None = None


MethodFn = Callable[..., CompressionPlan]
_METHODS: dict[str, MethodFn] = {}
# sampled token states entering each MoE layer that a method reconstructs from (0: statistics only)
_LAYER_INPUTS: dict[str, int] = {}
# methods that re-run the model layer by layer on the calibration tokens (`model_inputs`)
_SEQUENTIAL: set[str] = set()


# ---- registry ------------------------------------------------------------------------------------
def register_method(
    name: str, layer_inputs: int = 0, sequential: bool = False
) -> Callable[[Callable[..., Selection]], MethodFn]:
    """Register `fn` under `name`; the registered (and returned) callable produces a CompressionPlan.

    `layer_inputs` > 0: the method also needs that many sampled token states entering each MoE
    layer (`moe_inputs`) and the live blocks (`blocks`), so it cannot run from saved statistics.
    `sequential`: the method decides layer after layer on the hidden states its earlier decisions
    produce, so it takes `model_inputs` (a `ModelInputs`: the model and the calibration ids) and
    cannot run from saved statistics either.
    """

    def decorate(fn: Callable[..., Selection]) -> MethodFn:
        params = inspect.signature(fn).parameters
        required = COMMON_ARGS + (("model_inputs",) if sequential else ())
        missing = [a for a in required if a not in params]
        if missing:
            raise TypeError(f"method {name!r} must accept {', '.join(missing)}")
        defaults = {
            p.name: p.default
            for p in params.values()
            if p.name not in required and p.kind is p.KEYWORD_ONLY
        }

        @functools.wraps(fn)
        def run(
            stats: CalibrationStats,
            ratio: float,
            *,
            seed: int = 0,
            blocks: dict[int, MoEBlock] | None = None,
            moe_inputs: dict[int, torch.Tensor] | None = None,
            model_inputs: ModelInputs | None = None,
            **hp: Any,
        ) -> CompressionPlan:
            unknown = sorted(set(hp) - set(defaults))
            if unknown:
                takes = ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "none"
                raise MoepressError(
                    f"method {name!r} has no hyperparameter {', '.join(unknown)}; it takes: {takes}"
                )
            check_ratio(ratio)
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise MoepressError(f"seed must be a non-negative integer (got {seed!r})")
            if not stats.layers:
                raise MoepressError("the statistics hold no MoE layer; calibrate the model first")
            extra: dict[str, Any] = {}
            if sequential:
                if model_inputs is None:
                    raise MoepressError(
                        f"{name} re-runs the model layer by layer on calibration tokens: give the model and "
                        "data (--data FILE), not saved statistics"
                    )
                extra["model_inputs"] = model_inputs
            selection = fn(stats, ratio, seed=seed, blocks=blocks, moe_inputs=moe_inputs, **extra, **hp)
            resolved = {"ratio": ratio, "seed": seed, **defaults, **hp, **selection.hyperparameters}
            return to_plan(name, stats, selection, resolved)

        run.hyperparameters = dict(defaults)  # type: ignore[attr-defined]
        _METHODS[name] = run
        _LAYER_INPUTS[name] = layer_inputs
        if sequential:
            _SEQUENTIAL.add(name)
        return run

    return decorate


def available_methods() -> list[str]:
    """Names of the registered expert-pruning methods, sorted."""
    return sorted(_METHODS)


def method_layer_inputs(name: str) -> int:
    """How many sampled MoE-layer inputs per layer method `name` needs (0: statistics suffice)."""
    get_method(name)
    return _LAYER_INPUTS[name]


def method_is_sequential(name: str) -> bool:
    """Whether method `name` re-runs the model layer by layer (it needs `model_inputs`)."""
    get_method(name)
    return name in _SEQUENTIAL


def get_method(name: str) -> MethodFn:
    """The method registered as `name`: `(stats, ratio, *, seed, blocks, moe_inputs, **hp) -> plan`."""
    if name not in _METHODS:
        raise MoepressError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


# ---- ratio → number of experts ---------------------------------------------------------------------
def check_ratio(ratio: float) -> None:
    """`ratio` is the share of routed experts to prune: a number strictly between 0 and 1."""
    ok = isinstance(ratio, int | float) and not isinstance(ratio, bool) and math.isfinite(ratio)
    if not ok or not 0 < ratio < 1:
        raise MoepressError(
            f"ratio must be a number in (0, 1), the share of routed experts to prune (got {ratio!r}); "
            "e.g. --ratio 0.25"
        )


def round_half_up(x: float) -> int:
    """Nearest integer, halves rounded up (Python's round() sends 2.5 to 2, which surprises users)."""
    return math.floor(x + 0.5)


def experts_to_prune(num_experts: int, top_k: int, ratio: float) -> int:
    """How many of a layer's `num_experts` routed experts `ratio` prunes: ratio × E rounded to the
    nearest integer, halves up (0.25 × 60 = 15; 0.1 × 64 = 6.4 → 6; 0.0625 × 8 = 0.5 → 1).

    Raises MoepressError when that is 0 ("ratio too low": the plan would change nothing) or when
    fewer than `top_k` experts would remain ("ratio too high": every token routes to top_k experts,
    so at least that many full experts must stay).
    """
    check_ratio(ratio)
    n = round_half_up(ratio * num_experts)
    if n == 0:
        raise MoepressError(
            f"ratio too low: {ratio} of {num_experts} experts rounds to 0 pruned; "
            f"use a ratio of at least {1 / num_experts:.4g}"
        )
    if num_experts - n < top_k:
        raise MoepressError(
            f"ratio too high: pruning {n} of {num_experts} experts leaves {num_experts - n}, fewer than the "
            f"{top_k} each token routes to; use a ratio of at most {(num_experts - top_k) / num_experts:.4g}"
        )
    return n


# ---- choosing which experts go ---------------------------------------------------------------------
Keys = dict[int, Sequence[Sequence[float]]]  # layer -> per expert, a tuple sorted ascending = prune first


def _ordered(keys: Sequence[Sequence[float]]) -> list[int]:
    # The expert id is the last key, so ties always break the same way (lower id first).
    return sorted(range(len(keys)), key=lambda e: (*keys[e], e))


def choose_uniform(stats: CalibrationStats, ratio: float, keys: Keys) -> dict[int, list[int]]:
    """The same share in every layer: the `experts_to_prune` lowest-keyed experts of each layer."""
    out = {}
    for i in sorted(stats.layers):
        s = stats[i]
        n = experts_to_prune(s.num_experts, s.top_k, ratio)
        out[i] = sorted(_ordered(keys[i])[:n])
    return out


def choose_global(stats: CalibrationStats, ratio: float, keys: Keys) -> dict[int, list[int]]:
    """One budget for the whole model: round(ratio × all routed experts) pruned, lowest keys first
    across layers, never leaving a layer fewer than its top_k experts.

    Keys must be comparable across layers (e.g. normalised within each layer). Taking the globally
    lowest keys and skipping a layer once it reaches its cap minimises the total key pruned under
    the per-layer caps (a greedy choice is optimal for this kind of constraint).
    """
    check_ratio(ratio)
    layers = sorted(stats.layers)
    total_experts = sum(stats[i].num_experts for i in layers)
    caps = {i: stats[i].num_experts - stats[i].top_k for i in layers}
    budget = round_half_up(ratio * total_experts)
    if budget == 0:
        raise MoepressError(
            f"ratio too low: {ratio} of {total_experts} experts rounds to 0 pruned; "
            f"use a ratio of at least {1 / total_experts:.4g}"
        )
    if budget > sum(caps.values()):
        raise MoepressError(
            f"ratio too high: pruning {budget} of {total_experts} experts cannot leave every layer its "
            f"top_k experts; use a ratio of at most {sum(caps.values()) / total_experts:.4g}"
        )
    candidates = sorted((*k, i, e) for i in layers for e, k in enumerate(keys[i]))
    out: dict[int, list[int]] = {i: [] for i in layers}
    taken = 0
    for *_, i, e in candidates:
        if taken == budget:
            break
        if len(out[i]) < caps[i]:
            out[i].append(e)
            taken += 1
    return {i: sorted(v) for i, v in out.items()}


# ---- the plan ------------------------------------------------------------------------------------
def _by_layer(d: dict[int, Any]) -> dict[str, Any]:
    # JSON object keys are strings; storing them so keeps a saved-and-loaded plan equal to this one.
    return {str(i): v for i, v in sorted(d.items())}


def to_plan(
    method: str, stats: CalibrationStats, sel: Selection, hyperparameters: dict[str, Any]
) -> CompressionPlan:
    """Turn a Selection into a CompressionPlan: pruned experts become novices (their mean output over
    routed calibration tokens, `LayerStats.out_mean`; a zero vector when `sel.zero_novices`) when
    `sel.novices`, else leave the router."""
    layers = {}
    for i, gone in sel.pruned.items():
        s = stats[i]
        if not gone:
            layers[i] = Keep()
            continue
        keep = [e for e in range(s.num_experts) if e not in set(gone)]
        if len(keep) < s.top_k:  # a method bug, not a user error: the helpers above prevent it
            raise AssertionError(f"layer {i}: {len(keep)} experts kept < top_k={s.top_k}")
        merges = {
            g.representative: Merge(members=g.members, coefficients=g.coefficients, aligned=sorted(g.permutations))
            for g in sel.merges.get(i, []) if len(g.members) > 1
        }
        layers[i] = Prune(keep_experts=keep, novices=gone if sel.novices else [], merges=merges,
                          router_rows=sel.router_rows)
    plan = CompressionPlan(
        method=method,
        hyperparameters=hyperparameters,
        model_fingerprint=stats.meta.get("model_fingerprint"),
        data_fingerprint=stats.meta.get("data_fingerprint"),
        layers=layers,
        metadata={
            "score": sel.score_name,
            "scores": _by_layer(sel.scores),
            "pruned": _by_layer(sel.pruned),
            "novices": sel.novices,
            **({"novice_vectors": "zero" if sel.zero_novices else "mean output"} if sel.novices else {}),
            "calibration_tokens": _by_layer({i: stats[i].tokens for i in sel.pruned}),
            **sel.metadata,
        },
    )
    for i, groups in sel.merges.items():
        for g in groups:
            for member, perm in g.permutations.items():
                plan.set_alignment(i, g.representative, member, perm)
    if sel.novices:
        for i, gone in sel.pruned.items():
            for e in gone:
                # Never-routed experts have out_mean 0: a zero novice keeps their router row (so the
                # other experts' routing weights do not change) and adds nothing, as they did.
                mean = stats[i].out_mean[e]
                plan.set_novice(i, e, torch.zeros_like(mean) if sel.zero_novices else mean)
    return plan


def floats(t: torch.Tensor) -> list[float]:
    """A tensor as a list of plain floats (JSON-ready, NaN-free by construction of the callers)."""
    return [float(v) for v in t.double().tolist()]
