"""What a user sees first: the family, which layers are MoE, experts, routing and where the bytes are."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from moepress.models import get_adapter

COMPONENTS = (
    "embeddings", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms_other",
)


@dataclass
class ModelSummary:
    family: str
    num_layers: int
    moe_layers: list[int]
    routed_experts: int
    shared_intermediate: int
    expert_intermediate: int
    top_k: int
    scoring: str
    norm_topk: bool
    routed_scaling: float
    group_limited: bool
    parameters: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    supports: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bytes_by_component(model: nn.Module, adapter=None) -> tuple[dict[str, int], dict[str, int]]:
    """(parameter counts, bytes) per component, with a 'total'."""
    adapter = adapter or get_adapter(model)
    params: dict[str, int] = defaultdict(int)
    nbytes: dict[str, int] = defaultdict(int)
    for name, p in model.named_parameters():
        c = adapter.component(name)
        params[c] += p.numel()
        nbytes[c] += p.numel() * p.element_size()
    params["total"] = sum(params.values())
    nbytes["total"] = sum(nbytes.values())
    return {c: params.get(c, 0) for c in (*COMPONENTS, "total")}, {c: nbytes.get(c, 0) for c in (*COMPONENTS, "total")}


def summarize(model: nn.Module) -> ModelSummary:
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    # a compressed model's first MoE layer may hold moepress's modules (novices, merged experts): the
    # expert sizes are read off the first layer that still has the family's own experts
    first = next((b for b in blocks.values() if _sizes(b) is not None), next(iter(blocks.values())))
    experts, shared, intermediate = _sizes(first) or (first.router_weight.shape[0], 0, 0)
    params, nbytes = bytes_by_component(model, adapter)
    r = first.routing
    return ModelSummary(
        family=adapter.family,
        num_layers=len(adapter.layers(model)),
        moe_layers=sorted(blocks),
        routed_experts=experts,
        shared_intermediate=shared,
        expert_intermediate=intermediate,
        top_k=first.top_k,
        scoring=r.scoring,
        norm_topk=r.norm_topk,
        routed_scaling=r.scaling,
        group_limited=bool(r.n_group and r.n_group > 1),
        parameters=params,
        bytes=nbytes,
        supports=supported_actions(first),
    )


def _sizes(block) -> tuple[int, int, int] | None:
    """(routed experts, shared intermediate, expert intermediate) of a block, None where its experts are
    moepress's modules rather than the family's."""
    try:
        return block.num_experts, block.shared_intermediate, block.expert_intermediate
    except AttributeError:
        return None


def supported_actions(block) -> list[str]:
    """What moepress can do to this family's MoE layers (every family supports every action; the
    condensed form depends on whether one dense MLP can reproduce its experts)."""
    condensed = "dense MLP" if block.condenses_to_dense else "the family's experts class"
    if block.condense_keeps_router:
        condensed = "the family's block with its router, fixed-weight experts"
    return [
        "expert pruning (plain checkpoint when uniform)",
        "novices (MoNE)",
        "expert merging (plain checkpoint)",
        f"condensing (CD-MoE; {condensed})",
        "layer drop",
    ]
