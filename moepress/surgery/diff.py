"""What two plans do differently, layer by layer and expert by expert (`moepress diff a.json b.json`)."""

from __future__ import annotations

import torch

from moepress.plan import CompressionPlan, Condense, Keep, LayerAction, Prune


def describe_action(action: LayerAction) -> str:
    if isinstance(action, Prune):
        merged = f", {len(action.merges)} merged" if action.merges else ""
        rows = ", every router row kept" if action.router_rows == "all" else ""
        return f"prune (keep {len(action.keep_experts)} experts, {len(action.novices)} novices{merged}{rows})"
    if isinstance(action, Condense):
        shared = " + shared" if action.keep_shared else ""
        return f"condense ({len(action.experts)} experts{shared})"
    return action.action


def diff_plans(a: CompressionPlan, b: CompressionPlan) -> list[str]:
    """One line per difference, `a` first then `b`; empty when the plans would do the same thing."""
    lines = []
    if a.model_fingerprint != b.model_fingerprint:
        lines.append(f"model: {a.model_fingerprint} -> {b.model_fingerprint} (plans for different models)")
    for i in sorted(set(a.layers) | set(b.layers)):
        x, y = a.layers.get(i, Keep()), b.layers.get(i, Keep())
        if x.action != y.action:
            lines.append(f"layer {i}: {describe_action(x)} -> {describe_action(y)}")
        elif isinstance(x, Prune):
            lines += _sets(i, "kept experts", x.keep_experts, y.keep_experts)
            lines += _sets(i, "novices", x.novices, y.novices)
            if x.router_rows != y.router_rows:
                lines.append(f"layer {i}: router rows {x.router_rows} -> {y.router_rows}")
            va, vb = _novices(a, i), _novices(b, i)
            for e in sorted(set(x.novices) & set(y.novices)):
                if e in va and e in vb and not torch.equal(va[e], vb[e]):
                    delta = (va[e] - vb[e]).abs().max().item()
                    lines.append(f"layer {i}: novice {e} vector differs (max |diff| {delta:.3g})")
            for rep in sorted(set(x.merges) | set(y.merges)):
                mx, my = x.merges.get(rep), y.merges.get(rep)
                if mx != my:
                    lines.append(f"layer {i}: merge into expert {rep}: {_merge(mx)} -> {_merge(my)}")
        elif isinstance(x, Condense):
            lines += _sets(i, "condensed experts", x.experts, y.experts)
            wa, wb = (
                dict(zip(x.experts, x.weights, strict=True)),
                dict(zip(y.experts, y.weights, strict=True)),
            )
            for e in sorted(set(wa) & set(wb)):
                if wa[e] != wb[e]:
                    lines.append(f"layer {i}: weight of expert {e}: {wa[e]:.6g} -> {wb[e]:.6g}")
            if x.keep_shared != y.keep_shared:
                lines.append(f"layer {i}: keep_shared {x.keep_shared} -> {y.keep_shared}")
    return lines


def _merge(merge) -> str:
    if merge is None:
        return "none"
    return ", ".join(f"{m}×{c:.3g}" for m, c in zip(merge.members, merge.coefficients, strict=True))


def _sets(layer: int, what: str, a: list[int], b: list[int]) -> list[str]:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if not (only_a or only_b):
        return []
    return [f"layer {layer}: {what} only in a {only_a}, only in b {only_b}"]


def _novices(plan: CompressionPlan, layer: int) -> dict[int, torch.Tensor]:
    """The plan's novice vectors of a layer that it has (a hand-edited plan may lack some)."""
    action = plan.layers[layer]
    keys = {e: plan.novice_key(layer, e) for e in action.novices}
    return {e: plan.tensors[k] for e, k in keys.items() if k in plan.tensors}
