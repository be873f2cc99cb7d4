"""What the expert-merging methods (HC-SMoE, M-SMoE, REAM) share: features of experts on sampled
tokens, distances between experts, average-linkage clustering, neuron alignment by weight matching,
and turning groups into a `Selection`.

A merging method keeps E' = E − `experts_to_prune(E, top_k, ratio)` experts per layer: it splits the
E experts into E' groups, and each group becomes one expert (the `MergedExpert` written by surgery,
`moepress.surgery.merge`). The router (hyperparameter `router`, `ROUTER_MODES`):
- "all-rows" (the default, as the three references compute): every one of the E router rows stays and
  each member of a group routes to the group's merged expert (top-k over all E logits; members chosen
  together add their weights on it). The checkpoint stores E' experts and E router rows in moepress's
  own format (`Prune.router_rows="all"`).
- "representative": only the representative's row stays, the other members' go; every layer keeps
  the same E', so the output is the source architecture with fewer experts (plain transformers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moepress.calibrate.stats import CalibrationStats, LayerStats
from moepress.errors import MoepressError
from moepress.methods.base import MergedExpert, Selection, experts_to_prune, floats
from moepress.models.base import MoEBlock

# Sampled token states per MoE layer the merging methods read expert outputs and router logits on:
# the same number as NAEE's, so a recipe mixing them calibrates once and each sees what it would alone.
SAMPLED_INPUTS = 512


def kept_count(s: LayerStats, ratio: float) -> int:
    """E' of a layer (raises the one-line "ratio too high ... at most R" error when E' < top_k)."""
    return s.num_experts - experts_to_prune(s.num_experts, s.top_k, ratio)


def check_inputs(
    name: str, stats: CalibrationStats, blocks: dict[int, MoEBlock] | None, moe_inputs: dict[int, torch.Tensor] | None
) -> None:
    """The blocks and sampled MoE inputs a merging method reads, for every layer of the statistics."""
    if blocks is None or moe_inputs is None:
        raise MoepressError(
            f"{name} reads expert outputs and weights: pass blocks=get_adapter(model).blocks(model) and the "
            f"sampled MoE inputs from calibrate(model, ids, keep_moe_inputs={SAMPLED_INPUTS}).moe_inputs"
        )
    for i in stats.layers:
        if i not in blocks or i not in moe_inputs or moe_inputs[i].numel() == 0:
            raise MoepressError(
                f"{name}: no MoE block or sampled inputs for layer {i}; calibrate with keep_moe_inputs > 0 "
                "on the same model"
            )
        if blocks[i].num_experts != stats[i].num_experts:
            raise MoepressError(
                f"{name}: layer {i} has {blocks[i].num_experts} experts but the statistics "
                f"{stats[i].num_experts}; calibrate this model again"
            )


# ---- expert features on sampled tokens ----------------------------------------------------------------
@torch.no_grad()
def mean_outputs(block: MoEBlock, x: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """[E, H] float64: each expert's output averaged over ALL tokens x (not only those routed to it);
    `gated`: each token's output first scaled by the softmax of its router logits for that expert
    (REAM's router-weighted activation)."""
    weight = block.experts.weights(0)[1]  # up: every expert has one (gate is None for non-gated experts)
    x = x.reshape(-1, block.hidden_size).to(weight.device, weight.dtype)
    probs = block.router_logits(x).softmax(dim=-1) if gated else None
    rows = []
    for e in range(block.num_experts):
        y = block.expert(x, e).double()
        if probs is not None:
            y = y * probs[:, e, None].double()
        rows.append(y.mean(0))
    return torch.stack(rows).cpu()


@torch.no_grad()
def router_logits(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """[N, E] float64 router logits of tokens x, for the E real experts only (a router's extra rows,
    e.g. LongCat-Flash's identity experts, are not experts to group)."""
    x = x.reshape(-1, block.hidden_size).to(block.router_weight.device)
    return block.router_logits(x)[:, : block.num_experts].double().cpu()


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """[E, E] float64: 1 − cosine similarity between rows (0 on the diagonal)."""
    unit = F.normalize(features.double(), dim=-1, eps=1e-12)
    d = (1 - unit @ unit.T).clamp(min=0)
    d.fill_diagonal_(0)
    return d


def euclidean_distance(features: torch.Tensor) -> torch.Tensor:
    return torch.cdist(features.double(), features.double())


# ---- grouping ------------------------------------------------------------------------------------------
LINKAGES = ("average", "single", "complete")


def agglomerate(
    distance: torch.Tensor, n_clusters: int, linkage: str = "average", max_size: int | None = None
) -> list[list[int]]:
    """Agglomerative clustering: repeatedly join the two clusters at least distance until `n_clusters`
    remain, the distance between clusters being the mean (`average`, UPGMA), least (`single`) or
    largest (`complete`) pairwise distance between their members (Lance–Williams updates; the joins
    scipy's `cluster.hierarchy.linkage` makes). `max_size`: never join two clusters into more than
    `max_size` members (raised by one whenever no pair fits, so the count is always reached). Ties
    join the lowest (i, j) first; clusters come back sorted by their smallest member, members
    ascending. O(E³) at worst: trivial for E ≤ 256."""
    if linkage not in LINKAGES:
        raise MoepressError(f"linkage must be one of {', '.join(LINKAGES)} (got {linkage!r})")
    n = distance.shape[0]
    d = distance.double().clone()
    d.fill_diagonal_(float("inf"))
    members: dict[int, list[int]] = {e: [e] for e in range(n)}
    size = torch.ones(n, dtype=torch.long)
    cap = max_size
    while len(members) > n_clusters:
        candidates = d
        if cap is not None:
            while True:
                candidates = d.masked_fill(size[:, None] + size[None, :] > cap, float("inf"))
                if torch.isfinite(candidates).any():
                    break
                cap += 1
        flat = int(torch.argmin(candidates))  # first minimum in row-major order: deterministic ties
        i, j = sorted(divmod(flat, n))
        ni, nj = len(members[i]), len(members[j])
        if linkage == "average":  # the mean distance to the joined cluster
            d[i] = (ni * d[i] + nj * d[j]) / (ni + nj)
        elif linkage == "single":
            d[i] = torch.minimum(d[i], d[j])
        else:
            d[i] = torch.maximum(d[i], d[j])
        d[:, i] = d[i]
        d[i, i] = float("inf")
        d[j] = float("inf")
        d[:, j] = float("inf")
        members[i] += members.pop(j)
        size[i], size[j] = ni + nj, 0
    return sorted(sorted(m) for m in members.values())


def average_linkage(distance: torch.Tensor, n_clusters: int) -> list[list[int]]:
    """`agglomerate` with average linkage (UPGMA) and no size bound."""
    return agglomerate(distance, n_clusters, "average")


def nearest_centre(similarity: torch.Tensor, centres: Sequence[int]) -> list[list[int]]:
    """Each non-centre expert joins the centre it is most similar to (ties: the lower centre id);
    one group per centre, the centre first."""
    groups = {c: [c] for c in centres}
    order = sorted(centres)
    for e in range(similarity.shape[0]):
        if e in groups:
            continue
        best = max(order, key=lambda c: (float(similarity[e, c]), -c))
        groups[best].append(e)
    return [groups[c] for c in centres]


# ---- merging ---------------------------------------------------------------------------------------------
def weighted_coefficients(weights: torch.Tensor, members: Sequence[int]) -> list[float]:
    """`weights[m]` / Σ over the group (frequency- or saliency-weighted averaging); equal shares when
    every member weighs 0 (a group of never-routed experts)."""
    w = weights.double()[list(members)].clamp(min=0)
    total = float(w.sum())
    if total <= 0:
        return [1.0 / len(members)] * len(members)
    return floats(w / total)


@torch.no_grad()
def neuron_features(block: MoEBlock, e: int) -> torch.Tensor:
    """[I, 3H] float64 ([I, 2H] without a gate): per intermediate neuron, its gate row, up row and
    down column — what weight matching compares."""
    gate, up, down = block.experts.weights(e)
    return torch.cat([w for w in (gate, up, down.T) if w is not None], dim=1).double().cpu()


def match_neurons(cost: torch.Tensor) -> torch.Tensor:
    """The permutation p minimising Σ_a cost[a, p[a]] (Hungarian algorithm, scipy's
    `linear_sum_assignment`): neuron p[a] of the member goes to position a, beside the centre's a."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def merged_experts(
    groups: Sequence[Sequence[int]],
    representatives: Sequence[int],
    weights: torch.Tensor,
    permutation=None,
) -> list[MergedExpert]:
    """One `MergedExpert` per group of more than one expert, coefficients ∝ `weights`;
    `permutation(representative, member)` gives a member's neuron alignment (None: no alignment)."""
    out = []
    for group, rep in zip(groups, representatives, strict=True):
        if len(group) < 2:
            continue
        members = sorted(group)
        perms = {} if permutation is None else {m: permutation(rep, m) for m in members if m != rep}
        out.append(MergedExpert(rep, members, weighted_coefficients(weights, members), perms))
    return out


ROUTER_MODES = ("all-rows", "representative")


def check_router(name: str, router: str, blocks: dict[int, MoEBlock] | None = None) -> None:
    """Refuse an unknown router mode, and "all-rows" on a block whose experts cannot be reached through
    a map from router rows to merged experts (one line naming the other mode)."""
    if router not in ROUTER_MODES:
        raise MoepressError(f"{name}: router must be one of {', '.join(ROUTER_MODES)} (got {router!r})")
    if router == "all-rows":
        for i, block in sorted((blocks or {}).items()):
            if block.mapping_refusal:
                raise MoepressError(
                    f"{name}: layer {i} cannot keep all router rows ({block.mapping_refusal}); "
                    "use --hp router=representative"
                )


def selection(
    groups: dict[int, list[list[int]]],
    representatives: dict[int, list[int]],
    merges: dict[int, list[MergedExpert]],
    scores: dict[int, list[float]],
    score_name: str,
    metadata: dict | None = None,
    router: str = "all-rows",
) -> Selection:
    """The Selection of a merging method: per layer, every non-representative member's expert goes;
    its router row goes too (`router="representative"`) or routes to the merged expert ("all-rows")."""
    pruned = {
        i: sorted(e for g in groups[i] for e in g if e not in set(representatives[i])) for i in sorted(groups)
    }
    return Selection(
        pruned=pruned,
        scores=scores,
        score_name=score_name,
        merges=merges,
        router_rows="all" if router == "all-rows" else "kept",
        metadata={
            "groups": {str(i): [sorted(g) for g in groups[i]] for i in sorted(groups)},
            "representatives": {str(i): sorted(representatives[i]) for i in sorted(groups)},
            **(metadata or {}),
        },
    )
