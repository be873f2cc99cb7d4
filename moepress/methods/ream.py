"""REAM (Jha et al. 2026, "REAM: Merging Improves Pruning of Experts in LLMs",
github.com/SamsungSAILMontreal/ream): Router-weighted Expert Activation Merging, layer after layer on
the merged model.

Sequential (the reference's default; `sequential=False` is its `--no_sequential`): the decoder layers
run one at a time over the calibration tokens, as in `calibrate.runner`; at each MoE layer the
statistics are collected on the hidden states the ALREADY MERGED earlier layers produce, the layer is
merged, and the merged layer (built by the same surgery that writes the checkpoint) produces the next
layer's inputs. The model itself is not changed: each layer is merged in a copy.

Per MoE layer, from the reference's `ream/merger.py` and `ream/ream.py`:
1. Saliency: the REAP score (`LayerStats.reap_score`: mean over routed tokens of gate weight ×
   ‖expert output‖); zeros (never-routed experts) raised to min(0.5, least non-zero score) so that
   they can still be merged.
2. Centres: the E' = E − round(ratio·E) most salient experts (ties: lower id).
3. Similarity, on the `SAMPLED_INPUTS` (512) token states sampled at this layer: the average of
   (a) (1 + cosine)/2 between the experts' router-weighted mean outputs over ALL sampled tokens,
   mean_t softmax(logits_t)_e · expert_e(x_t) (`gated_sim`), and (b) 1 − d/max d, d the Euclidean
   distance between the experts' unit-normalised logit columns (`use_gate_output`; `gate_similarity=False`
   drops it). Distance = 1 − similarity.
4. Grouping ("pseudo-pruning", `pseudo_group`): centres in descending saliency each take the
   `group_size` − 1 (C = 16) nearest experts not yet taken; `group_size=0` is M-SMoE's
   nearest-centre rule. Needs E' · C ≥ E.
5. Merge: coefficients ∝ saliency within the group; each member's intermediate neurons are aligned
   to the centre's first (Hungarian algorithm) on the cost "Euclidean distance between unit-normalised
   activation patterns over the sampled tokens + between unit-normalised weight rows (gate row, up
   row, down column)" — the reference's `logits+weights` merging, which first reduces the weight rows
   by PCA (to 64 dimensions, for speed); moepress compares them whole.
6. Router (`router="all-rows"`, the default, as the reference): every member keeps its router row and
   routes to the merged expert; `router="representative"`: the merged expert keeps the centre's row.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from moepress.calibrate.runner import capture_inputs, model_device, run_layer
from moepress.calibrate.stats import CalibrationStats, LayerStats
from moepress.errors import MoepressError
from moepress.methods.base import MergedExpert, ModelInputs, Selection, floats, register_method, to_plan
from moepress.methods.merging import (
    SAMPLED_INPUTS,
    check_router,
    cosine_distance,
    kept_count,
    match_neurons,
    mean_outputs,
    merged_experts,
    nearest_centre,
    neuron_features,
    router_logits,
    selection,
)
from moepress.models import get_adapter
from moepress.models.base import MoEBlock
from moepress.progress import progress

GROUP_SIZE = 16


def saliency(s: LayerStats) -> torch.Tensor:
    """REAP scores with zeros raised to min(0.5, least non-zero score) (all zero: all 1)."""
    score = s.reap_score.double().clone()
    zero = score <= 0
    if zero.all():
        return torch.ones_like(score)
    score[zero] = min(0.5, float(score[~zero].min()))
    return score


def expert_distance(block: MoEBlock, x: torch.Tensor, gate_similarity: bool) -> torch.Tensor:
    """[E, E] float64: 1 − REAM's similarity (router-weighted outputs, optionally router logits)."""
    similarity = 1 - cosine_distance(mean_outputs(block, x, gated=True)) / 2  # (1 + cos) / 2
    if gate_similarity:
        columns = F.normalize(router_logits(block, x).T, dim=-1, eps=1e-12)
        d = torch.cdist(columns, columns)
        top = float(d.max())
        similarity = (similarity + (1 - d / top if top > 0 else torch.ones_like(d))) / 2
    return 1 - similarity


def pseudo_group(distance: torch.Tensor, centres: list[int], group_size: int) -> list[list[int]]:
    """REAM's grouping: centres (most salient first) each take their `group_size` − 1 nearest free
    experts; `group_size=0`: every expert joins its nearest centre."""
    if group_size == 0:
        return nearest_centre(-distance, centres)
    n = distance.shape[0]
    groups = {c: [c] for c in centres}
    taken = set(centres)
    for c in centres:
        for e in sorted(range(n), key=lambda e: (float(distance[c, e]), e)):
            if len(groups[c]) >= group_size or len(taken) == n:
                break
            if e not in taken:
                groups[c].append(e)
                taken.add(e)
    return [groups[c] for c in centres]


@torch.no_grad()
def activation_matching(block: MoEBlock, x: torch.Tensor):
    """`permutation(centre, member)` by REAM's cost: activation patterns plus weight rows."""
    weight = block.experts.weights(0)[1]
    x = x.reshape(-1, block.hidden_size).to(weight.device, weight.dtype)

    act_fn = block.experts.act_fn

    @torch.no_grad()
    def activations(e: int) -> torch.Tensor:  # [I, N]: each neuron's activation over the tokens
        gate, up, _ = block.experts.weights(e)
        h = act_fn(F.linear(x, up)) if gate is None else act_fn(F.linear(x, gate)) * F.linear(x, up)
        return h.T.double().cpu()

    def unit(t: torch.Tensor) -> torch.Tensor:
        return F.normalize(t, dim=-1, eps=1e-12)

    @torch.no_grad()
    def permutation(centre: int, member: int) -> torch.Tensor:
        cost = torch.cdist(unit(neuron_features(block, centre)), unit(neuron_features(block, member)))
        # activations only where act(gate)·up is the experts' computation: a store that runs the family's
        # own module may not name its activation, and a custom gating (gpt-oss, Inkling-2) is not it
        if act_fn is not None and getattr(block.experts, "is_plain_mlp", True):
            cost += torch.cdist(unit(activations(centre)), unit(activations(member)))
        return match_neurons(cost)

    return permutation


def merge_layer(
    s: LayerStats, block: MoEBlock, x: torch.Tensor, ratio: float, group_size: int, gate_similarity: bool
) -> tuple[list[list[int]], list[int], list[MergedExpert], torch.Tensor]:
    """(groups, centres, merged experts, saliency) of one layer."""
    n_keep = kept_count(s, ratio)
    if group_size and n_keep * group_size < s.num_experts:
        raise MoepressError(
            f"ream: {n_keep} groups of at most group_size={group_size} cannot hold layer {s.layer}'s "
            f"{s.num_experts} experts; use group_size of at least {math.ceil(s.num_experts / n_keep)} "
            "(or 0 for nearest-centre grouping)"
        )
    sal = saliency(s)
    centres = sorted(range(s.num_experts), key=lambda e: (-float(sal[e]), e))[:n_keep]
    groups = pseudo_group(expert_distance(block, x, gate_similarity), centres, group_size)
    return groups, centres, merged_experts(groups, centres, sal, activation_matching(block, x)), sal


@register_method("ream", sequential=True)
def ream(
    stats: CalibrationStats,
    ratio: float,
    *,
    seed: int = 0,
    blocks=None,
    moe_inputs=None,
    model_inputs: ModelInputs | None = None,
    group_size: int = GROUP_SIZE,
    gate_similarity: bool = True,
    sequential: bool = True,
    router: str = "all-rows",
) -> Selection:
    """Merge each layer into its E·(1−ratio) most salient experts, statistics re-collected layer by
    layer on the merged model (`sequential=False`: on the original model)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise MoepressError(f"group_size must be a non-negative integer (got {group_size!r}); the default is 16")
    model = model_inputs.model
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    check_router("ream", router, {i: adapter.block(i, layers[i]) for i in stats.layers})
    home = model_device(model)
    device = torch.device(model_inputs.device) if model_inputs.device is not None else home
    inputs = capture_inputs(model, model_inputs.input_ids, model_inputs.batch_size, adapter, device)
    g = torch.Generator().manual_seed(seed)  # the same sample rule as `calibrate(keep_moe_inputs=...)`
    groups, reps, merges, scores, collected = {}, {}, {}, {}, {}
    moe_ids = set(adapter.moe_layer_ids(model))
    for i in progress(range(max(stats.layers) + 1), "ream: merging layer by layer"):
        layer = layers[i].to(device)
        try:
            if i not in stats.layers:
                run_layer(layer, inputs, device, index=i)
                continue
            if i not in moe_ids:
                raise MoepressError(f"ream: layer {i} of the statistics is not an MoE layer of this model")
            block = adapter.block(i, layer)
            s = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
            seen: list[torch.Tensor] = []

            def hook(_module, args, kwargs, block=block, s=s, seen=seen):
                x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, block.hidden_size)
                s.update(block.bind(*args, **kwargs), x)
                seen.append(x.to("cpu", copy=True))

            handle = block.module.register_forward_pre_hook(hook, with_kwargs=True)
            try:
                run_layer(layer, inputs, device, replace=not sequential, index=i)
            finally:
                handle.remove()
            allx = torch.cat(seen)
            x = allx[torch.randperm(allx.shape[0], generator=g)[:SAMPLED_INPUTS].sort().values]
            groups[i], reps[i], merges[i], sal = merge_layer(s.to_("cpu"), block, x, ratio, group_size,
                                                             gate_similarity)
            scores[i], collected[i] = floats(sal), s.tokens
            if sequential:  # the next layer sees what the merged layer outputs
                run_layer(merged_copy(model, layer, block, stats, i, groups, reps, merges, router), inputs,
                          device, index=i)
        finally:
            layers[i] = layer.to(home)
    return selection(
        groups, reps, merges, scores,
        score_name="REAP saliency (zeros raised to the least non-zero score): centres and merge coefficients",
        metadata={"sequential": sequential, "recollected_tokens": {str(i): n for i, n in collected.items()}},
        router=router,
    )


def merged_copy(model, layer, block: MoEBlock, stats: CalibrationStats, i: int, groups, reps, merges,
                router: str = "all-rows"):
    """A copy of decoder layer i with this layer's merge applied by the checkpoint's own surgery."""
    from moepress.surgery.apply import describe, rebuild_layer

    one = CalibrationStats(layers={i: stats[i]}, meta=stats.meta)
    chosen = selection({i: groups[i]}, {i: reps[i]}, {i: merges[i]}, {i: []}, "", router=router)
    plan = to_plan("ream", one, chosen, {})
    structure = describe(model, plan, get_adapter(model), {i: block})
    copied = copy.deepcopy(layer)
    rebuild_layer(model.config, structure, copied, get_adapter(model).block(i, copied), plan, i)
    return copied
