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
    first = next(iter(blocks.values()))
    params, nbytes = bytes_by_component(model, adapter)
    r = first.routing
    return ModelSummary(
        family=adapter.family,
        num_layers=len(adapter.layers(model)),
        moe_layers=sorted(blocks),
        routed_experts=first.num_experts,
        shared_intermediate=first.shared_intermediate,
        expert_intermediate=first.expert_intermediate,
        top_k=first.top_k,
        scoring=r.scoring,
        norm_topk=r.norm_topk,
        routed_scaling=r.scaling,
        group_limited=bool(r.n_group and r.n_group > 1),
        parameters=params,
        bytes=nbytes,
        supports=supported_actions(first),
    )


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
