"""Apply a CompressionPlan to a loaded model, in place: surgery changes, it decides nothing.

Per MoE layer:
- `prune`: the router keeps the rows of kept experts and novices (ascending original id; DeepSeek-V3's
  `e_score_correction_bias` likewise) and becomes the family's own router class built at that size,
  so routing after pruning is exactly `MoEBlock.route(x, active=kept ∪ novices)`. The experts become
  the family's experts class built with the kept experts only (a `NoviceExperts` around it when the
  layer has novices), or, for ModuleList storage, the kept modules with a `ConstantExpert` per novice.
  With `merges`, each representative's weights are first overwritten by its merge
  (`surgery.merge`: coefficient-weighted sum of its members' neuron-aligned weights), in place.
  With `router_rows="all"` the router (and any per-expert tensor of the block) stays as it is, all E
  rows, and the experts become a `MappedExperts`: the kept experts behind the plan's map from router
  row to kept expert, so routing is the family's own over all E rows.
- `condense`: the whole block becomes one `CondensedMLP` (or `CondensedExperts`); a block whose shared
  output depends on routing (`condense_keeps_router`) stays, only its experts become `FixedWeightExperts`.
- `drop`: the whole block becomes a `DroppedMLP` (residual only).
- Where the family's config can list dense layers (Qwen's `mlp_only_layers`) and that keeps the whole
  output plain, condensed and dropped layers become the family's own dense MLP instead, zero-padded
  (`surgery.dense`; `dense_layers="never"` opts out).

What a pruned router computes, per family (the scores are over the remaining rows only, so a
softmax renormalises over the kept experts and novices):
- DeepSeek-V2: softmax over remaining experts, top-k (group-limited over groups of the remaining
  experts when `topk_method="group_limited_greedy"`), no renormalisation, times `routed_scaling_factor`.
- DeepSeek-V3: sigmoid scores (independent of pruning) plus the sliced correction bias for the
  choice, group-limited top-k over `n_group` groups of the remaining experts, chosen scores
  renormalised to sum 1 (`norm_topk_prob`), times `routed_scaling_factor`.
- Qwen2-MoE / Qwen1.5-MoE: softmax over remaining experts, top-k, no renormalisation.
- Qwen3-MoE and OLMoE: softmax over remaining experts, top-k, renormalised when `norm_topk_prob`.
- Mixtral: softmax over remaining experts, top-2, always renormalised.
- DeepSeekMoE-16B (remote code): softmax over remaining experts, top-k, renormalised only when
  `norm_topk_prob` (False for the released model).
Group-limited routing needs the remaining count to split into `n_group` equal groups; that is checked
before any tensor moves.

The config records the result: when the original architecture expresses it (every MoE layer pruned
to the same number of experts, no novices, nothing condensed or dropped but as the family's dense
layers) the family's expert-count field (and dense-layer list) is updated and nothing else;
otherwise `config.moepress_structure` describes every changed layer (see `moepress.modules.compressed`),
which is what a written checkpoint is rebuilt from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moepress.errors import MoepressError
from moepress.model_size import size_by_component
from moepress.models import Adapter, MoEBlock, get_adapter
from moepress.modules.compressed import (
    STRUCTURE_VERSION,
    build_layer,
    module_path,
    set_block_tensors,
    set_num_experts,
)
from moepress.plan import CompressionPlan, Condense, Drop, Keep, LayerAction, Prune, model_fingerprint
from moepress.surgery.architecture import activation_name, uniform_expert_count
from moepress.surgery.dense import dense_layer_ids, dense_state, describe_dense
from moepress.surgery.merge import write_merges


@dataclass(frozen=True)
class SourceRecord:
    """The model before surgery, kept on the compressed model (`model.moepress_source`) for the
    checkpoint manifest, and the adapter that names its components."""

    fingerprint: str
    path: str | None
    params: dict[str, int]
    bytes: dict[str, int]
    adapter: Adapter
    # the manifest's word on layers written as the family's own dense MLP (`surgery.dense`); None: none
    dense_layers: dict[str, Any] | None = None


def apply_plan(model: nn.Module, plan: CompressionPlan, *, dense_layers: str = "auto") -> nn.Module:
    """Compress `model` in place as `plan` says and return it. Raises MoepressError before any tensor
    moves when the plan does not fit the model. `dense_layers` ("auto" or "never"): whether condensed
    and dropped layers may become the family's own dense layers (`surgery.dense`)."""
    adapter, blocks, structure = prepare(model, plan, dense_layers)
    record = source_record(model, adapter)
    uniform = uniform_expert_count(model, plan, adapter, dense=dense_ids(structure))  # before any layer changes
    layers = adapter.layers(model)
    for idx in structure["layers"]:
        i = int(idx)
        rebuild_layer(model.config, structure, layers[i], blocks[i], plan, i, adapter=adapter)
    finish_model(model, adapter, structure, record, uniform)
    return model


def dense_ids(structure: dict[str, Any]) -> set[int]:
    """The layers `structure` writes as the family's own dense MLP."""
    return set(structure.get("dense", {}).get("layers", ()))


def prepare(
    model: nn.Module, plan: CompressionPlan, dense_layers: str = "auto"
) -> tuple[Adapter, dict[int, MoEBlock], dict[str, Any]]:
    """Check `plan` against `model` (shapes only: works on a meta-device skeleton) and describe the
    compressed structure; returns the adapter, the blocks the plan changes and the structure (whose
    `dense` entry, if any, names the layers written as the family's dense MLP: `finish_model` moves
    them to the config's own list)."""
    if getattr(model.config, "moepress_structure", None) is not None:
        raise MoepressError(
            "this model was already compressed (it carries a moepress structure); apply plans to the original"
        )
    adapter = get_adapter(model)
    plan.validate_for(model, adapter)
    layers = adapter.layers(model)
    blocks = {i: adapter.block(i, layers[i]) for i, a in plan.layers.items() if not isinstance(a, Keep)}
    for i, block in blocks.items():
        _check_fits(block, plan.action(i))
    structure = describe(model, plan, adapter, blocks)
    ids = dense_layer_ids(model, plan, adapter, blocks, dense_layers)
    if ids:
        placement = adapter.dense_placement(model.config)
        up = blocks[ids[0]].experts.weights(0)[1]
        specs = {i: structure["layers"][str(i)] for i in ids}
        rows = {i: spec.get("shared_rows", 0) + spec.get("routed_rows", 0) for i, spec in specs.items()}
        structure["dense"] = describe_dense(
            placement, ids, rows, blocks[ids[0]].hidden_size, up.element_size(), placement.gated
        )
        for i in ids:
            structure["layers"][str(i)]["dense"] = True
    return adapter, blocks, structure


def source_record(model: nn.Module, adapter: Adapter) -> SourceRecord:
    """What the manifest says of the original, taken before any layer changes."""
    params, nbytes = size_by_component(model, adapter)
    return SourceRecord(
        fingerprint=model_fingerprint(model),
        path=getattr(model.config, "_name_or_path", None) or None,
        params=params,
        bytes=nbytes,
        adapter=adapter,
    )


def finish_model(
    model: nn.Module, adapter: Adapter, structure: dict[str, Any], record: SourceRecord, uniform: int | None
) -> None:
    """Once every changed layer is rebuilt: the config says what the checkpoint holds (`uniform`: the
    routed-expert count when the result is expressible in the original architecture; layers written as
    the family's dense MLP join the config's list of them)."""
    dense = structure.get("dense")
    if dense:
        text = model.config.get_text_config()
        setattr(text, dense["key"], sorted(set(getattr(text, dense["key"], None) or []) | set(dense["layers"])))
        layers = {k: v for k, v in structure["layers"].items() if not v.get("dense")}
        structure = {k: v for k, v in structure.items() if k != "dense"} | {"layers": layers}
        record = replace(record, dense_layers=dense_note(dense))
    if uniform is not None:
        set_num_experts(model.config.get_text_config(), adapter.num_experts_key, uniform)
    elif structure["layers"]:
        model.config.moepress_structure = structure
    model.moepress_source = record


def dense_note(dense: dict[str, Any]) -> dict[str, Any]:
    """What the manifest says of layers written as the family's dense MLP."""
    return {
        "config_field": dense["key"],
        "layers": dense["layers"],
        "width": dense["width"],
        "zero_bytes": dense["zero_bytes"],
        "note": (
            "condensed or dropped MoE layers written as the family's own dense MLP, zero-padded to its width "
            f"and listed in `{dense['key']}`, so the checkpoint loads as the source architecture; the zero "
            "rows (a dropped layer is all zeros) cost zero_bytes, which moepress's own modules would not "
            "(apply with dense_layers='never' for those)"
        ),
    }


@torch.no_grad()
def rebuild_layer(
    config,
    structure: dict[str, Any],
    layer: nn.Module,
    block: MoEBlock,
    plan: CompressionPlan,
    i: int,
    adapter: Adapter | None = None,
) -> None:
    """Replace decoder layer i's MLP pieces in place by their compressed form (`structure`'s entry;
    `adapter` builds the family's dense MLP for a layer written as one)."""
    state = _layer_state(block, plan.action(i), plan.novices(i), structure, plan.alignments(i))
    if structure["layers"][str(i)].get("dense"):
        if adapter is None:
            raise ValueError(f"layer {i} becomes the family's dense MLP; pass the adapter that builds it")
        dense = structure["dense"]
        values = dense_state(block, plan.action(i), state, structure["mlp"], dense["width"])
        with torch.device("meta"):
            new = {dense["path"]: adapter.dense_mlp(config)}
        state = {f"{dense['path']}.{k}": v for k, v in values.items()}
    else:
        with torch.device("meta"):
            new = build_layer(config, structure, layer, structure["layers"][str(i)])
    for path, module in new.items():
        module.load_state_dict(
            {k[len(path) + 1 :]: v for k, v in state.items() if k.startswith(path + ".")},
            strict=True,
            assign=True,
        )
        left = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
        if left:
            raise RuntimeError(f"layer {i}: {path} has tensors without weights: {left}")
        layer.set_submodule(path, module)
    spec = structure["layers"][str(i)]
    if spec.get("block_tensors"):
        active = torch.tensor(spec["experts"], dtype=torch.long)
        values = {n: t.index_select(0, active.to(t.device)) for n, t in _block_expert_tensors(block).items()}
        set_block_tensors(layer, structure, spec, values)


def _block_expert_tensors(block: MoEBlock) -> dict[str, torch.Tensor]:
    """Per-expert tensors the MoE block module owns itself (first dimension = its expert count)."""
    tensors = dict(block.module.named_parameters(recurse=False)) | dict(block.module.named_buffers(recurse=False))
    return {n: t for n, t in tensors.items() if t.ndim and t.shape[0] == block.num_experts}


def describe(
    model: nn.Module, plan: CompressionPlan, adapter: Adapter, blocks: dict[int, MoEBlock]
) -> dict[str, Any]:
    """The `moepress_structure` of the compressed model: names where the pieces live (found on the
    model, so no family is hard-coded here), the base class, and one entry per changed layer."""
    layers = adapter.layers(model)
    structure: dict[str, Any] = {
        "version": STRUCTURE_VERSION,
        "base": base_class(model),
        "num_experts_key": adapter.num_experts_key,
        "layers_path": _path_of(model, layers),
        "layers": {},
    }
    for i, block in sorted(blocks.items()):
        action = plan.action(i)
        owner = block.module if block.owner is None else block.owner  # where the router and experts hang
        structure.setdefault("mlp", _path_of(layers[i], owner))
        structure.setdefault("router", _path_of(owner, block.router))
        structure.setdefault("experts", _path_of(owner, block.experts.module))
        if block.expert_parts:  # experts spread over several modules of the block
            structure.setdefault("expert_parts", list(block.expert_parts))
        if block.sized_by_block:  # the router and experts classes are built from sizes, not a config
            structure["sized_by_block"] = True
        if block.returns_tuple:
            structure["returns_tuple"] = True
        if getattr(block, "post_norm", None) is not None:  # the block normalises its own output (A.X-K1)
            structure.setdefault("post_norm", _path_of(block.module, block.post_norm))
        if isinstance(action, Prune) and action.router_rows == "all":
            spec = {
                "action": "prune",
                "experts": sorted(action.keep_experts),
                "novices": [],
                "expert_map": action.expert_map(block.num_experts),
            }
        elif isinstance(action, Prune):
            spec = {
                "action": "prune",
                "experts": sorted(action.keep_experts + action.novices),
                "novices": list(action.novices),
            }
            block_tensors = _block_expert_tensors(block)
            if block_tensors:
                spec["block_tensors"] = sorted(block_tensors)
        elif isinstance(action, Condense):
            keep_shared = action.keep_shared and block.shared is not None
            if block.shared is not None:
                structure.setdefault("shared", _path_of(block.module, block.shared))
            if block.shared_gate is not None:
                structure.setdefault("shared_gate", _path_of(block.module, block.shared_gate))
            if block.condense_keeps_router:
                spec = {"action": "condense", "form": "routed", "experts": len(action.experts)}
            elif block.condenses_to_dense:
                spec = {
                    "action": "condense",
                    "shared_rows": block.shared_intermediate if keep_shared else 0,
                    "routed_rows": len(action.experts) * block.expert_intermediate,
                    "shared_gate": keep_shared and block.shared_gate is not None,
                    "hidden_act": activation_name(block.experts.act_fn, model.config),
                    "gated": block.experts.weights(0)[0] is not None,
                }
                if block.output_bias is not None and action.keep_shared:  # always on, like shared experts
                    spec["output_bias"] = True
            else:
                spec = {
                    "action": "condense",
                    "form": "experts",
                    "experts": len(action.experts),
                    "shared": keep_shared,
                    "shared_gate": keep_shared and block.shared_gate is not None,
                }
        else:
            spec = {"action": "drop", "form": "routed"} if block.drop_keeps_router else {"action": "drop"}
        structure["layers"][str(i)] = spec
    return structure


def base_class(model: nn.Module) -> dict[str, str]:
    """Where the model's class comes from: `transformers` itself, or (remote code) a module file
    that travels with the checkpoint, named relative (`.modeling_deepseek`)."""
    import transformers

    cls = type(model)
    if cls.__module__.startswith("transformers."):
        module = "transformers" if getattr(transformers, cls.__name__, None) is cls else cls.__module__
        return {"module": module, "class": cls.__name__}
    return {"module": "." + cls.__module__.rsplit(".", 1)[-1], "class": cls.__name__}


def _condensed_experts_state(block: MoEBlock, action: Condense, structure: dict[str, Any]) -> dict[str, torch.Tensor]:
    """A `CondensedExperts` layer's tensors: the chosen experts' slices of every per-expert tensor of
    the family's experts module, their fixed weights, and the shared experts and gate as they are."""
    mlp = structure["mlp"]
    experts = block.experts.module
    chosen = torch.tensor(action.experts, dtype=torch.long, device=next(experts.parameters()).device)
    state = {f"{mlp}.experts.{k}": t for k, t in _kept_experts_state(block, action.experts).items()}
    dtype = next(experts.parameters()).dtype
    state[f"{mlp}.weights"] = torch.tensor(action.weights, dtype=dtype, device=chosen.device)
    if action.keep_shared and block.shared is not None:
        state.update({f"{mlp}.shared.{k}": t for k, t in block.shared.state_dict().items()})
        if block.shared_gate is not None:
            state.update({f"{mlp}.shared_gate.{k}": t for k, t in block.shared_gate.state_dict().items()})
    return state | _post_norm_state(block, structure)


def _post_norm_state(block: MoEBlock, structure: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of the block's own output norm, which a condensed block keeps (none without one)."""
    name = structure.get("post_norm")
    if name is None:
        return {}
    return {f"{structure['mlp']}.{name}.{k}": t for k, t in block.module.get_submodule(name).state_dict().items()}


def _kept_experts_state(block: MoEBlock, kept: list[int]) -> dict[str, torch.Tensor]:
    """The experts module's tensors with only experts `kept` (in that order): the store's own
    `kept_state` where its layout is not one expert per leading index (DBRX's [E·I, H] matrices),
    else every tensor whose first dimension is the expert count, sliced."""
    if hasattr(block.experts, "kept_state"):
        return block.experts.kept_state(kept)
    return _kept_rows(block.experts.module, block.num_experts, kept)


def _kept_rows(module: nn.Module, n_experts: int, kept: list[int]) -> dict[str, torch.Tensor]:
    """`module`'s tensors, those with a leading per-expert dimension holding only experts `kept`."""
    index = torch.tensor(kept, dtype=torch.long, device=next(module.parameters()).device)
    return {
        k: t.index_select(0, index) if t.ndim and t.shape[0] == n_experts else t
        for k, t in module.state_dict().items()
    }


def _path_of(root: nn.Module, target: nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is target)


def _check_fits(block: MoEBlock, action: LayerAction) -> None:
    """What `plan.validate_for` cannot know: the family's routing constraints and module shapes."""
    i, r = block.layer_idx, block.routing
    if isinstance(action, Prune) and action.router_rows == "all":
        if block.mapping_refusal:
            raise MoepressError(
                f"plan: layer {i} cannot keep all router rows over merged experts: {block.mapping_refusal}; "
                "plan the merge with --hp router=representative"
            )
        return  # the router is not changed: nothing below applies
    if isinstance(action, Prune) and action.novices and not block.supports_novices:
        raise MoepressError(
            f"plan: layer {i} has no place for a novice (a constant output standing in for an expert): "
            f"{block.novice_refusal}; use a method without novices (frequency, reap, a merge)"
        )
    if isinstance(action, Prune) and r.n_group and r.n_group > 1:
        n = len(action.keep_experts) + len(action.novices)
        if n % r.n_group or n // r.n_group * r.topk_group < r.top_k:
            raise MoepressError(
                f"plan: layer {i} keeps {n} experts, but group-limited routing needs a multiple of "
                f"n_group={r.n_group} with at least {r.top_k} experts in the best {r.topk_group} group(s)"
            )
    if isinstance(action, Condense) and block.condense_keeps_router and block.shared is not None:
        if not action.keep_shared:
            raise MoepressError(f"plan: layer {i}'s shared experts are scaled by its router, so a condensed "
                                "layer keeps them (keep_shared=true)")
    if isinstance(action, Condense) and block.shared is not None and action.keep_shared:
        projections = [getattr(block.shared, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
        if any(getattr(p, "bias", None) is not None for p in projections):
            raise MoepressError(
                f"plan: layer {i}'s shared experts have biases; condensing them is not supported"
            )


def _layer_state(
    block: MoEBlock,
    action: LayerAction,
    novices: dict[int, torch.Tensor],
    structure: dict[str, Any],
    alignments: dict[tuple[int, int], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The compressed layer's new tensors, keyed by path under the decoder layer (merged experts are
    written into the live weights first: the layer is being replaced anyway)."""
    mlp = structure["mlp"]
    gate, up, _ = block.experts.weights(0)
    dtype, device = up.dtype, up.device
    if isinstance(action, Drop):
        return {}
    if isinstance(action, Condense):
        if block.condense_keeps_router:  # the block stays; its experts become the chosen ones at fixed weights
            experts = module_path(mlp, structure["experts"])
            state = {f"{experts}.experts.{k}": t for k, t in _kept_experts_state(block, action.experts).items()}
            state[f"{experts}.weights"] = torch.tensor(action.weights, dtype=dtype, device=device)
            return state
        if not block.condenses_to_dense:
            return _condensed_experts_state(block, action, structure)
        rows: list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]] = []
        keep_shared = action.keep_shared and block.shared is not None
        if keep_shared:
            s = block.shared
            gate_proj = getattr(s, "gate_proj", None)
            rows.append((None if gate_proj is None else gate_proj.weight, s.up_proj.weight, s.down_proj.weight))
        for e, w in zip(action.experts, action.weights, strict=True):
            rows.append(block.condensed_rows(e, w))
        if not rows:  # neither shared nor routed rows: a zero-width MLP, whose output is 0
            hidden = block.hidden_size
            empty = up.new_empty(0, hidden)
            rows.append((None if gate is None else empty, empty, up.new_empty(hidden, 0)))
        gates, ups, downs = zip(*rows, strict=True)
        state = {f"{mlp}.up_proj.weight": torch.cat(ups), f"{mlp}.down_proj.weight": torch.cat(downs, dim=1)}
        if gate is not None:
            state[f"{mlp}.gate_proj.weight"] = torch.cat(gates)
        if keep_shared and block.shared_gate is not None:
            state[f"{mlp}.shared_gate.weight"] = block.shared_gate.weight
        if block.output_bias is not None and action.keep_shared:  # the block's own output bias, always on
            state[f"{mlp}.down_proj.bias"] = block.output_bias
        return state | _post_norm_state(block, structure)

    write_merges(block.experts, action.merges, alignments or {}, block.layer_idx)
    if action.router_rows == "all":  # the router stays; the kept experts go behind the map
        experts = module_path(mlp, structure["experts"], "kept")
        return {f"{experts}.{k}": t for k, t in _kept_experts_state(block, action.keep_experts).items()}
    n_experts = block.num_experts
    active = sorted(action.keep_experts + action.novices)
    router = module_path(mlp, structure["router"])
    experts = module_path(mlp, structure["experts"])
    state = {}
    extra = block.extra_router_rows  # LongCat-Flash's identity experts: rows kept after the kept experts'
    named = block.router_expert_tensors  # the router's per-expert tensors by name, where shapes could mislead
    for k, t in block.router.state_dict().items():
        index = torch.tensor(active, dtype=torch.long, device=t.device)
        if named is not None and k not in named:
            pass
        elif t.ndim and extra and t.shape[0] == n_experts + extra:
            t = t.index_select(0, torch.cat([index, torch.arange(n_experts, t.shape[0], device=t.device)]))
        elif t.ndim and t.shape[0] == n_experts:
            t = t.index_select(0, index)
        elif t.ndim > 1 and t.shape[-1] == n_experts:  # ERNIE-4.5 keeps its choice bias as [1, E]
            t = t.index_select(-1, index)
        state[f"{router}.{k}"] = t
    module = block.experts.module
    if isinstance(module, nn.ModuleList):
        for slot, e in enumerate(active):
            if e in novices:
                state[f"{experts}.{slot}.vector"] = novices[e].to(device=device, dtype=dtype)
            else:
                state.update({f"{experts}.{slot}.{k}": t for k, t in module[e].state_dict().items()})
        return state
    if block.expert_parts:  # several experts modules: each keeps the kept experts' rows, the last the novices
        for part in block.expert_parts:
            prefix = module_path(mlp, part, "kept" if action.novices else "")
            kept = _kept_rows(block.module.get_submodule(part), n_experts, action.keep_experts)
            state.update({f"{prefix}.{k}": t for k, t in kept.items()})
        experts = module_path(mlp, block.expert_parts[-1])
    else:
        prefix = f"{experts}.kept" if action.novices else experts
        state.update({f"{prefix}.{k}": t for k, t in _kept_experts_state(block, action.keep_experts).items()})
    if action.novices:
        state[f"{experts}.novices"] = torch.stack([novices[e] for e in action.novices]).to(
            device=device, dtype=dtype
        )
    return state
