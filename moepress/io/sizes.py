"""What a checkpoint weighs: measured on a model (`moepress.model_size`, re-exported here), or
predicted for a plan before any tensor moves.

Both count what `save_pretrained` writes: every parameter and persistent buffer once (tied weights
once), in its own dtype. The prediction is arithmetic on the source model's shapes, independent of
the surgery code (but for which layers `surgery.dense` writes as dense MLPs), so the tests that
compare it with written files check the surgery too.
"""

from __future__ import annotations

from torch import nn

from moepress.model_size import Size, saved_tensors, size_by_component, size_of
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Condense, Drop, Prune
from moepress.surgery.dense import dense_layer_ids

__all__ = ["Size", "predict_bytes", "predict_size", "saved_tensors", "size_by_component", "size_of"]


def _sum(tensors) -> Size:
    tensors = list(tensors)
    return Size(sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors))


def _rows(tensors, n_old: int, n_new: int, extra: int = 0) -> Size:
    """Size of the tensors once those with a leading per-expert dimension keep `n_new` of `n_old`
    (`extra` trailing rows, kept always, as LongCat-Flash's identity experts' router rows)."""
    params = nbytes = 0
    for t in tensors:
        per_expert = t.ndim and (t.shape[0] == n_old or (t.ndim > 1 and t.shape[-1] == n_old))
        if extra and t.ndim and t.shape[0] == n_old + extra:
            n = t.numel() // (n_old + extra) * (n_new + extra)
        else:
            n = t.numel() // n_old * n_new if per_expert else t.numel()
        params += n
        nbytes += n * t.element_size()
    return Size(params, nbytes)


def _kept_experts(block, kept: list[int]) -> Size:
    """Size of the experts module holding only experts `kept`: the store's `kept_state` where its layout
    is not one expert per leading index (DBRX's [E·I, H] matrices), else the per-expert rows."""
    if hasattr(block.experts, "kept_state"):
        return _sum(block.experts.kept_state(kept).values())
    tensors = [t for m in _expert_modules(block) for _, t in saved_tensors(m)]
    return _rows(tensors, block.num_experts, len(kept))


def _expert_modules(block) -> list[nn.Module]:
    """The modules holding the block's experts: its `expert_parts` where they are several."""
    return [block.module.get_submodule(p) for p in block.expert_parts] or [block.experts.module]


def predict_size(model: nn.Module, plan: CompressionPlan, dense_layers: str = "auto") -> Size:
    """Parameters and bytes of the checkpoint `plan` would produce from `model` (not changed); layers
    written as the family's own dense MLP (`surgery.dense`, `dense_layers` as for `apply_plan`) count
    its full width, zero rows included."""
    adapter = get_adapter(model)
    plan.validate_for(model, adapter)
    total = size_of(model)
    params, nbytes = total.params, total.bytes
    layers = adapter.layers(model)
    changed = {i: adapter.block(i, layers[i]) for i, a in plan.layers.items() if isinstance(a, Condense | Drop)}
    dense = set(dense_layer_ids(model, plan, adapter, changed, dense_layers))
    width = adapter.dense_placement(model.config).width if dense else 0
    for i, action in plan.layers.items():
        if not isinstance(action, Prune | Condense | Drop):
            continue
        block = adapter.block(i, layers[i])
        old = _sum(t for _, t in saved_tensors(block.module))
        gate, up, _ = block.experts.weights(0)
        itemsize, hidden = up.element_size(), block.hidden_size
        keep_shared = isinstance(action, Condense) and action.keep_shared and block.shared is not None
        shared_gate = keep_shared and block.shared_gate is not None
        post_norm = getattr(block, "post_norm", None)  # a condensed block keeps the block's output norm
        norm = _sum(t for _, t in saved_tensors(post_norm)) if post_norm is not None else Size(0, 0)
        if i in dense:  # the family's dense MLP at its full width
            n = (2 if gate is None else 3) * width * hidden
            new = Size(n, n * itemsize)
        elif isinstance(action, Drop) and block.drop_keeps_router:  # the block less its experts
            gone = _sum(t for _, t in saved_tensors(block.experts.module))
            new = Size(old.params - gone.params, old.bytes - gone.bytes)
        elif isinstance(action, Drop):  # a block on the layer itself (`owner`) keeps the router the layer calls
            new = Size(0, 0) if block.owner is None else _sum(t for _, t in saved_tensors(block.router))
        elif isinstance(action, Condense) and block.condense_keeps_router:  # the block less its unchosen experts
            gone = _sum(t for _, t in saved_tensors(block.experts.module))
            kept = _kept_experts(block, action.experts)
            k = len(action.experts)
            new = Size(old.params - gone.params + kept.params + k, old.bytes - gone.bytes + kept.bytes + k * itemsize)
        elif isinstance(action, Condense) and block.condenses_to_dense:
            shared = block.shared_intermediate if keep_shared else 0
            rows = shared + len(action.experts) * block.expert_intermediate
            n = (2 if gate is None else 3) * rows * hidden + (hidden if shared_gate else 0)
            n += hidden if block.output_bias is not None and action.keep_shared else 0  # kept as down_proj's bias
            new = Size(n + norm.params, n * itemsize + norm.bytes)
        elif isinstance(action, Prune) and action.router_rows == "all":  # the block less its unkept experts
            gone = _sum(t for _, t in saved_tensors(block.experts.module))
            kept = _kept_experts(block, action.keep_experts)
            new = Size(old.params - gone.params + kept.params, old.bytes - gone.bytes + kept.bytes)
        elif isinstance(action, Condense):  # the family's experts class with the chosen experts (CondensedExperts)
            k = len(action.experts)
            kept = _kept_experts(block, action.experts)
            shared = _sum(t for m in (block.shared, block.shared_gate) if keep_shared and m is not None
                          for _, t in saved_tensors(m) if m is block.shared or shared_gate)
            new = Size(
                kept.params + shared.params + k + norm.params, kept.bytes + shared.bytes + k * itemsize + norm.bytes
            )
        else:
            e, n_active = block.num_experts, len(action.keep_experts) + len(action.novices)
            router, experts = block.router, block.experts.module
            moved = {id(t) for m in (router, experts, *_expert_modules(block)) for _, t in saved_tensors(m)}
            own = {n: t for n, t in saved_tensors(block.module) if id(t) not in moved and "." not in n}
            block_rows = _rows([t for t in own.values() if t.ndim and t.shape[0] == e], e, n_active)
            moved |= {id(t) for t in own.values() if t.ndim and t.shape[0] == e}
            rest = _sum(t for _, t in saved_tensors(block.module) if id(t) not in moved)
            rest = Size(rest.params + block_rows.params, rest.bytes + block_rows.bytes)
            named = block.router_expert_tensors  # the router's per-expert tensors, when named
            routed = _rows([t for n, t in saved_tensors(router) if named is None or n in named], e, n_active,
                           block.extra_router_rows)
            fixed = _sum(t for n, t in saved_tensors(router) if named is not None and n not in named)
            routed = Size(routed.params + fixed.params, routed.bytes + fixed.bytes)
            if isinstance(experts, nn.ModuleList):
                kept = _sum(t for k in action.keep_experts for _, t in saved_tensors(experts[k]))
            else:
                kept = _kept_experts(block, action.keep_experts)
            novices = len(action.novices) * hidden
            new = Size(
                rest.params + routed.params + kept.params + novices,
                rest.bytes + routed.bytes + kept.bytes + novices * itemsize,
            )
        params += new.params - old.params
        nbytes += new.bytes - old.bytes
    return Size(params, nbytes)


def predict_bytes(model: nn.Module, plan: CompressionPlan) -> int:
    """Bytes of tensor data in the safetensors shards `plan` would produce from `model`."""
    return predict_size(model, plan).bytes
