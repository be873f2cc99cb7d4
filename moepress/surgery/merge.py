"""Merged experts: the weights a `Prune.merges` entry gives its representative.

A merged expert's gate/up/down = Σ_j c_j · P_j(member_j), where P_j permutes the member's
intermediate neurons (gate and up rows, down columns; the expert computes the same function
after it) so that matching neurons are averaged. Weights are read and written through
`ExpertStore.weights(e)` (and `biases(e)` where a store declares biases: gate and up biases are
permuted too), which every storage returns as views of the live parameters, so no family is named
here (a non-gated expert's gate is None). Any other per-expert tensor of the experts module (e.g. a
post-expert norm) is averaged with the same coefficients; its layout is unknown here, so permuting
members there is refused rather than done wrong.
"""

from __future__ import annotations

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.models.base import ExpertStore
from moepress.plan import Merge

Triple = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]  # (gate, up, down); gate None: not gated


def permuted(weights: Triple, perm: torch.Tensor | None, columns_last: bool = True) -> Triple:
    """(gate, up, down) with intermediate neurons reordered by `perm` (None: as they are): rows of
    gate and up, columns of down (`columns_last=False`: down has no intermediate axis, e.g. a bias)."""
    gate, up, down = weights
    if perm is None:
        return gate, up, down
    perm = perm.to(down.device)
    return (
        None if gate is None else gate[perm],
        None if up is None else up[perm],
        down[:, perm] if columns_last else down,
    )


def _weighted_sum(parts: list[Triple], coefficients: list[float]) -> Triple:
    """Σ_j c_j · parts[j], slot by slot, accumulated in float32 (float64 for float64 weights) and returned
    in each slot's dtype."""
    out = []
    for slot in zip(*parts, strict=True):
        if slot[0] is None:
            out.append(None)
            continue
        acc = torch.zeros_like(slot[0], dtype=torch.promote_types(slot[0].dtype, torch.float32))
        for t, c in zip(slot, coefficients, strict=True):
            acc.add_(t.to(acc.dtype), alpha=c)
        out.append(acc.to(slot[0].dtype))
    return tuple(out)  # type: ignore[return-value]


def _biases(store: ExpertStore, e: int) -> Triple | None:
    """The store's (gate, up, down) biases of expert e where it declares them (`biases(e)`), else None."""
    biases = getattr(store, "biases", None)
    return biases(e) if biases is not None else None


@torch.no_grad()
def merged_weights(store: ExpertStore, merge: Merge, perms: dict[int, torch.Tensor]) -> Triple:
    """Σ_j c_j · P_j(weights of member j)."""
    parts = [permuted(store.weights(m), perms.get(m)) for m in merge.members]
    return _weighted_sum(parts, merge.coefficients)


@torch.no_grad()
def merged_biases(store: ExpertStore, merge: Merge, perms: dict[int, torch.Tensor]) -> Triple | None:
    """Σ_j c_j · P_j(biases of member j), P_j reordering the gate and up biases (None: no biases)."""
    if _biases(store, merge.members[0]) is None:
        return None
    parts = [permuted(_biases(store, m), perms.get(m), columns_last=False) for m in merge.members]
    return _weighted_sum(parts, merge.coefficients)


def _storage_ptrs(store: ExpertStore, e: int) -> set[int]:
    views = [*store.weights(e), *(_biases(store, e) or ())]
    return {w.untyped_storage().data_ptr() for w in views if w is not None}


def _extra_per_expert(store: ExpertStore, n_experts: int) -> dict[str, tuple[nn.Module, str]]:
    """Per-expert tensors of the experts module other than the gate/up/down weights and the biases the
    store declares: name -> (owner, attr).

    Fused storage: tensors with a leading dimension of E; ModuleList storage: each expert's own tensors."""
    module = store.module
    weight_ptrs = _storage_ptrs(store, 0)
    if isinstance(module, nn.ModuleList):
        weight_ptrs = set().union(*(_storage_ptrs(store, e) for e in range(n_experts)))
        named = [(f"{e}.{n}", t) for e in range(n_experts) for n, t in module[e].state_dict(keep_vars=True).items()]
    else:
        named = [(n, t) for n, t in module.state_dict(keep_vars=True).items() if t.ndim and t.shape[0] == n_experts]
    out = {}
    for name, t in named:
        if t.untyped_storage().data_ptr() not in weight_ptrs:
            owner_path, _, attr = name.rpartition(".")
            out[name] = (module.get_submodule(owner_path) if owner_path else module, attr)
    return out


@torch.no_grad()
def write_merges(
    store: ExpertStore, merges: dict[int, Merge], alignments: dict[tuple[int, int], torch.Tensor], layer: int
) -> None:
    """Overwrite each representative's weights, IN PLACE in the live parameters, with its merge (all
    merges are computed before any is written, so a member is always read as it was)."""
    if not merges:
        return
    n_experts = store.num_experts
    extras = _extra_per_expert(store, n_experts)
    unknown = sorted(set(extras) - set(store.hidden_side_tensors))  # alignment does not permute the others
    if unknown and alignments:
        raise MoepressError(
            f"layer {layer}: the experts have per-expert tensors of unknown layout ({', '.join(unknown)}); "
            "merging them with neuron alignment is not supported; use the method without alignment"
        )
    perms = {rep: {m: p for (r, m), p in alignments.items() if r == rep} for rep in merges}
    new = {rep: merged_weights(store, merge, perms[rep]) for rep, merge in merges.items()}
    new_biases = {rep: merged_biases(store, merge, perms[rep]) for rep, merge in merges.items()}
    new_extras = {}
    for name, (owner, attr) in extras.items():
        t = getattr(owner, attr)
        if isinstance(store.module, nn.ModuleList):  # one tensor per expert: "{e}.path"
            e = int(name.split(".", 1)[0])
            merge = merges.get(e)
            if merge is not None:
                parts = [getattr(_owner_of(store.module, m, name), attr).float() for m in merge.members]
                new_extras[name] = sum(c * p for c, p in zip(merge.coefficients, parts, strict=True)).to(t.dtype)
        else:
            rows = t.detach().clone()
            for rep, merge in merges.items():
                rows[rep] = sum(c * t[m].float() for m, c in zip(merge.members, merge.coefficients, strict=True))
            new_extras[name] = rows
    for rep, weights in new.items():
        _write(store.weights(rep), weights, layer)
        if new_biases[rep] is not None:
            _write(_biases(store, rep), new_biases[rep], layer)
    for name, value in new_extras.items():
        owner, attr = extras[name]
        getattr(owner, attr).copy_(value)


def _write(views: Triple, values: Triple, layer: int) -> None:
    for view, value in zip(views, values, strict=True):
        if view is not None:
            view.copy_(value)
            if not torch.equal(view, value):
                raise RuntimeError(f"layer {layer}: the experts' weights(e) are not views of the parameters")


def _owner_of(experts: nn.ModuleList, e: int, name: str) -> nn.Module:
    """In expert e, the module that holds the tensor `name` ("{e'}.path.attr") has for expert e'."""
    path = name.split(".", 1)[1].rpartition(".")[0]
    return experts[e].get_submodule(path) if path else experts[e]
