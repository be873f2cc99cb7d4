"""The modules a compressed checkpoint needs, and the code that rebuilds a model's changed layers.

A compressed layer is one of: a pruned MoE block (fewer router rows and experts, maybe novice
slots), a merged block that keeps every router row over fewer stored experts (`MappedExperts`), a
condensed block (one dense gated MLP) or a dropped block (residual only). Which layer is
which is `config.moepress_structure`; `apply_structure` turns a freshly built model of the source
architecture into the compressed shapes, before the weights load.

This file is copied next to the weights of every checkpoint that the source architecture cannot
express (as `moepress_modules.py`, imported by `modeling_moepress.py`), so it imports only torch
and transformers and knows no model family: the family-specific names it needs (where the layers,
the router and the experts live; which config field counts the routed experts) are data in the
structure, written by moepress' adapters.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers.activations import ACT2FN

from moepress.versions import transformers_release

STRUCTURE_VERSION = 1


def module_path(*parts: str) -> str:
    """A dotted path from `parts`, empty ones skipped (a block whose router and experts are children of
    the decoder layer itself has the empty path: Gemma 4)."""
    return ".".join(p for p in parts if p)


def register_weight_conversions(model_type: str, source_model_type: str) -> None:
    """Let transformers convert a checkpoint of `model_type` as it converts its source family's.

    transformers finds the renames between the on-disk and in-memory layouts (per-expert tensors on
    disk, fused 3-D experts in memory) by model_type; under its own model_type a compressed checkpoint
    would load without them. Called only for a source architecture from transformers itself (a
    remote-code model's tensors load as they are)."""
    from transformers import conversion_mapping

    mapping = conversion_mapping.get_checkpoint_conversion_mapping(source_model_type)
    # registering the source's own model_type would also apply it to remote code of that model_type
    if mapping is not None and model_type != source_model_type:
        conversion_mapping.register_checkpoint_conversion_mapping(model_type, mapping, overwrite=True)


def _eager_rejects_sentinel() -> bool:
    return transformers_release() < (5, 18)


_EAGER_REJECTS_SENTINEL = _eager_rejects_sentinel()


def eager_safe_sentinel(kept: nn.Module, sentinel: int) -> int:
    """The expert id unused slots reach `kept` as: before transformers 5.18 the eager implementation
    one-hot encodes ids over `num_experts` classes and fails on the sentinel, so there they go to
    expert 0 at weight 0, as for DBRX."""
    if sentinel and _EAGER_REJECTS_SENTINEL:
        implementation = getattr(getattr(kept, "config", None), "_experts_implementation", None)
        if implementation in (None, "eager"):
            return 0
    return sentinel


class NoviceExperts(nn.Module):
    """Routed experts of a pruned layer whose router also keeps novice slots (MoNE).

    The pruned router has one row per slot: kept experts and novices interleaved in ascending
    original id order, and this module's forward takes indices in that numbering. `kept` is an
    instance of the family's own experts class holding only the kept experts, so transformers'
    experts implementations (eager, batched, grouped GEMM) still run them. A token routed to a
    novice slot gets `weight * novices[n]`: a constant vector standing in for the removed expert.

    Novice slots reach `kept` as the expert-parallel sentinel id `kept.num_experts` with weight 0,
    which every transformers experts implementation skips (that is what `_is_expert_parallel`
    switches on; eager skips it always), so a novice costs no expert GEMM. An experts class outside
    those implementations (DBRX's) may not skip it: there novices go to expert 0 at weight 0. The slot maps are plain
    Python lists turned into index tensors per device on first use, not buffers: transformers
    leaves non-persistent buffers of unknown modules uninitialised when it loads on the meta device.
    """

    def __init__(self, kept: nn.Module, novice_slots: list[int], hidden_size: int):
        super().__init__()
        self.kept = kept
        # classes of transformers' `use_experts_implementation` skip the sentinel id; another class
        # (DBRX's) gets the novice slots sent to its expert 0 at weight 0 instead
        self.sentinel = kept.num_experts if hasattr(kept, "has_gate") else 0
        kept._is_expert_parallel = True
        n_slots = kept.num_experts + len(novice_slots)
        novice = set(novice_slots)
        self.slot_is_novice = [s in novice for s in range(n_slots)]
        # slot -> index among kept experts, or among novices for a novice slot
        counts = [0, 0]
        self.slot_local = []
        for is_novice in self.slot_is_novice:
            self.slot_local.append(counts[is_novice])
            counts[is_novice] += 1
        self.novices = nn.Parameter(torch.empty(len(novice_slots), hidden_size))
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _slot_maps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = (
                torch.tensor(self.slot_is_novice, dtype=torch.bool, device=device),
                torch.tensor(self.slot_local, dtype=torch.long, device=device),
            )
        return self._maps[device]

    def _sentinel(self) -> int:
        return eager_safe_sentinel(self.kept, self.sentinel)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        is_novice, local = self._slot_maps(top_k_index.device)
        novice = is_novice[top_k_index]  # [N, k]
        index = local[top_k_index]
        if self.kept.num_experts:
            out = self.kept(
                hidden_states, index.masked_fill(novice, self._sentinel()), top_k_weights.masked_fill(novice, 0)
            )
        else:  # every slot is a novice; grouped GEMM cannot take zero experts
            out = torch.zeros_like(hidden_states)
        # per token, the summed router weight on each novice; then one small GEMM
        novice_weight = torch.zeros(
            top_k_index.shape[0], self.novices.shape[0], dtype=torch.float32, device=out.device
        ).scatter_add_(1, index.masked_fill(~novice, 0), top_k_weights.float().masked_fill(~novice, 0))
        # `out` in the kept experts' own output shape (DBRX's experts return [B, S, H] or [N, 1, H])
        return out + (novice_weight @ self.novices.float()).to(out.dtype).reshape(out.shape)


class MappedExperts(nn.Module):
    """Routed experts of a merged layer whose router keeps all its rows (HC-SMoE, M-SMoE and REAM as
    their references compute): `kept` is the family's own experts class holding the E' stored experts,
    and `expert_map[e]` is the stored expert that router row e reaches (a merge's members all reach
    the merged expert).

    The router picks its top-k over all E rows and normalises as the family does; here each chosen row
    becomes its stored expert, and where a token chose several rows of one stored expert their weights
    add up on its first slot (Σ w·f(x) = (Σ w)·f(x)), the others going to the expert-parallel sentinel
    at weight 0, as `NoviceExperts` sends novice slots: one expert GEMM per stored expert a token
    reaches. Ids past the map (a router's extra rows, as LongCat-Flash's identity experts) move down to
    follow the stored experts. The map is a plain list turned into an index tensor per device on first
    use, not a buffer (see `NoviceExperts`).
    """

    def __init__(self, kept: nn.Module, expert_map: list[int]):
        super().__init__()
        self.kept = kept
        self.expert_map = list(expert_map)
        self.sentinel = kept.num_experts if hasattr(kept, "has_gate") else 0
        kept._is_expert_parallel = True
        self._maps: dict[torch.device, torch.Tensor] = {}

    def _table(self, device: torch.device) -> torch.Tensor:
        if device not in self._maps:
            self._maps[device] = torch.tensor(self.expert_map, dtype=torch.long, device=device)
        return self._maps[device]

    def _sentinel(self) -> int:
        return eager_safe_sentinel(self.kept, self.sentinel)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if top_k_weights.shape != top_k_index.shape:
            raise ValueError(
                f"MappedExperts takes one weight per chosen expert (got weights {tuple(top_k_weights.shape)} "
                f"for ids {tuple(top_k_index.shape)})"
            )
        table = self._table(top_k_index.device)
        n_rows, n_kept = len(self.expert_map), self.kept.num_experts
        mapped = table[top_k_index.clamp(max=n_rows - 1)]
        index = torch.where(top_k_index < n_rows, mapped, top_k_index - n_rows + n_kept)
        # slots of one stored expert: their weights add up on the first, the others carry nothing
        same = (index[:, :, None] == index[:, None, :]) & (top_k_index < n_rows)[:, :, None]
        earlier = same & torch.ones_like(same[0]).tril(-1)
        repeat = earlier.any(dim=-1)
        # summed at least in float32 and in the activations' precision when that is higher (float64), and
        # passed on in the precision the experts would have multiplied them in
        dtype = torch.promote_types(top_k_weights.dtype, hidden_states.dtype)
        summed = (same.to(dtype) * top_k_weights.to(torch.promote_types(dtype, torch.float32))[:, None, :]).sum(-1)
        weights = torch.where(same.sum(dim=-1) > 1, summed.to(dtype), top_k_weights.to(dtype))
        return self.kept(hidden_states, index.masked_fill(repeat, self._sentinel()), weights.masked_fill(repeat, 0))


class SplitNoviceExperts(nn.Module):
    """One of the modules holding a pruned layer's experts when the block runs several in sequence, each
    as `part(rows, rows_per_slot)` (rows sorted by router slot, e.g. an input and an output projection
    per expert), and the router also keeps novice slots. `kept` is the family's own class holding only
    the kept experts and gets their slots' rows; a novice slot's rows come out as its vector from the
    last part (which holds `novices`, then weighted and summed by the block) and as zeros from an
    earlier part (the last part ignores what they carry). The slot maps are plain lists, as in
    `NoviceExperts`."""

    def __init__(self, kept: nn.Module, novice_slots: list[int], n_slots: int, hidden_size: int | None):
        super().__init__()
        self.kept = kept
        novice = set(novice_slots)
        self.slot_is_novice = [s in novice for s in range(n_slots)]
        self.slot_novice = {s: j for j, s in enumerate(novice_slots)}
        # only the last part carries the novices' vectors (hidden_size given)
        self.novices = None if hidden_size is None else nn.Parameter(torch.empty(len(novice_slots), hidden_size))

    def forward(self, inputs: torch.Tensor, rows_per_slot) -> torch.Tensor:
        sizes = [int(n) for n in rows_per_slot]
        chunks = inputs.split(sizes, dim=0)
        kept_sizes = [n for n, novice in zip(sizes, self.slot_is_novice, strict=True) if not novice]
        kept_out = None
        if kept_sizes:  # one call of the family's experts on the kept slots' rows, in slot order
            rows = [c for c, novice in zip(chunks, self.slot_is_novice, strict=True) if not novice]
            kept_out = self.kept(torch.cat(rows), kept_sizes).split(kept_sizes, dim=0)
        # an earlier part's novice rows: zeros of the kept experts' width (the input's if none is kept)
        width = inputs.shape[-1] if kept_out is None else kept_out[0].shape[-1]
        dtype = inputs.dtype if kept_out is None else kept_out[0].dtype
        out, kept_iter = [], iter(kept_out or ())
        for s, chunk in enumerate(chunks):
            if not self.slot_is_novice[s]:
                out.append(next(kept_iter))
            elif self.novices is not None:
                out.append(self.novices[self.slot_novice[s]].to(dtype).expand(chunk.shape[0], -1))
            else:
                out.append(chunk.new_zeros(chunk.shape[0], width, dtype=dtype))
        return torch.cat(out)


class ConstantExpert(nn.Module):
    """A novice in ModuleList expert storage: its output is its vector for every token, so the
    block's own `weight * expert(x)` becomes `weight * vector`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.vector = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vector.to(x.dtype).expand(*x.shape[:-1], -1)


def _add_post_norm(module: nn.Module, norm: nn.Module | None, name: str | None) -> str | None:
    """Register the block's own output norm (A.X-K1's `post_mlp_layernorm`: the block returns
    norm(routed + shared)) on a condensed block under the block's name for it, so its weights keep
    their checkpoint names; returns that name (None: no norm)."""
    if norm is None:
        return None
    module.add_module(name, norm)
    return name


def _post_norm(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out if module.post_norm_name is None else getattr(module, module.post_norm_name)(out)


class CondensedMLP(nn.Module):
    """A whole MoE block condensed into ONE dense gated MLP (CD-MoE): no router, one GEMM chain.

    Intermediate rows are the shared experts' rows (first `shared_rows`) followed by the chosen
    routed experts' rows; the down-projection columns of the routed rows are pre-scaled by their
    fixed weights, so `down(act(gate x) * up x)` equals `shared(x) + sum_i w_i expert_i(x)`.

    A sigmoid-gated shared expert (Qwen2-MoE) keeps its gate as it is rather than folded into the
    weights: the gate depends on x, so no fixed scaling reproduces it. We compute
    h = act(gate_proj x) * up_proj x over all rows, multiply the shared slice of h by
    sigmoid(shared_gate(x)), then apply the one down_proj; the cost is one [H -> 1] projection.
    """

    def __init__(
        self,
        hidden_size: int,
        shared_rows: int,
        routed_rows: int,
        hidden_act: str,
        shared_gate: bool,
        gated: bool = True,
        post_norm: nn.Module | None = None,
        post_norm_name: str | None = None,
        output_bias: bool = False,
    ):
        super().__init__()
        rows = shared_rows + routed_rows
        self.shared_rows = shared_rows
        # non-gated experts (NemotronH's relu² MLPs) are down(act(up x)): no gate_proj
        self.gate_proj = nn.Linear(hidden_size, rows, bias=False) if gated else None
        self.up_proj = nn.Linear(hidden_size, rows, bias=False)
        # a block that adds a bias to its output keeps it here (`output_bias`)
        self.down_proj = nn.Linear(rows, hidden_size, bias=output_bias)
        self.shared_gate = nn.Linear(hidden_size, 1, bias=False) if shared_gate else None
        self.act_fn = ACT2FN[hidden_act]
        self.post_norm_name = _add_post_norm(self, post_norm, post_norm_name)

    returns_tuple = False  # set per layer from the structure (gpt-oss and Llama-4 blocks return a pair)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.gate_proj is None:
            h = self.act_fn(self.up_proj(x))
        else:
            h = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        if self.shared_gate is not None:
            gate = torch.sigmoid(self.shared_gate(x))
            h = torch.cat([h[..., : self.shared_rows] * gate, h[..., self.shared_rows :]], dim=-1)
        out = _post_norm(self, self.down_proj(h))
        return (out, None) if self.returns_tuple else out


class CondensedExperts(nn.Module):
    """A condensed block whose experts one dense MLP cannot reproduce (biases, gpt-oss's clamped
    SwiGLU, a post-expert norm): the family's own experts class holding only the chosen experts,
    every token sent to all of them with the fixed weights, plus the shared experts and their sigmoid
    gate as the family had them. Output = shared(x) + Σ_i weights[i]·expert_i(x), as `CondensedMLP`.
    """

    def __init__(
        self,
        experts: nn.Module,
        n_experts: int,
        shared: nn.Module | None,
        shared_gate: nn.Module | None,
        post_norm: nn.Module | None = None,
        post_norm_name: str | None = None,
    ):
        super().__init__()
        self.experts = experts
        self.weights = nn.Parameter(torch.empty(n_experts))
        self.shared = shared
        self.shared_gate = shared_gate
        self.post_norm_name = _add_post_norm(self, post_norm, post_norm_name)

    returns_tuple = False

    def forward(self, x: torch.Tensor, *args, **kwargs):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        n, k = flat.shape[0], self.weights.shape[0]
        if k:
            index = torch.arange(k, device=flat.device).expand(n, k)
            out = self.experts(flat, index, self.weights.to(flat.dtype).expand(n, k)).reshape(flat.shape)
        else:
            out = torch.zeros_like(flat)
        if self.shared is not None:
            shared = self.shared(flat)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(flat)) * shared
            out = out + shared
        out = _post_norm(self, out.reshape(shape))
        return (out, None) if self.returns_tuple else out


class FixedWeightExperts(nn.Module):
    """The experts module of a condensed block that keeps its router, because the block's shared output
    depends on the routing (Inkling's per-token shared scales): the family's own experts class holding
    only the chosen experts, every token sent to all of them at their fixed weights, whatever indices
    and weights the router passes. The block around it (router, shared experts) stays as it was."""

    def __init__(self, experts: nn.Module, n_experts: int):
        super().__init__()
        self.experts = experts
        self.weights = nn.Parameter(torch.empty(n_experts))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        n, k = flat.shape[0], self.weights.shape[0]
        if not k:
            return torch.zeros_like(hidden_states)
        index = torch.arange(k, device=flat.device).expand(n, k)
        return self.experts(flat, index, self.weights.to(flat.dtype).expand(n, k)).reshape(hidden_states.shape)


class DroppedMLP(nn.Module):
    """A dropped MoE block: contributes nothing, so the decoder layer keeps only its residual."""

    returns_tuple = False

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(x)
        return (out, None) if self.returns_tuple else out


def set_num_experts(config, key: str, n: int) -> None:
    """Set the routed-expert count `key` of `config` to n; a dotted key names a field of a sub-config
    (DBRX: `ffn_config.moe_num_experts`)."""
    *owners, leaf = key.split(".")
    for name in owners:
        config = getattr(config, name)
    setattr(config, leaf, n)


def with_num_experts(config, key: str, n: int):
    """A copy of `config` whose routed-expert count (`key`) is `n`, to build a family's own
    router or experts class at the pruned size."""
    cfg = copy.deepcopy(config)
    set_num_experts(cfg, key, n)
    return cfg


def sized_config(config, key: str, n: int):
    """The config a family's router and experts are built from, at n experts: the object that holds
    the count (`config` itself, or the sub-config a dotted key names)."""
    cfg = with_num_experts(config, key, n)
    for name in key.split(".")[:-1]:
        cfg = getattr(cfg, name)
    return cfg


def _block_post_norm(mlp: nn.Module, structure: dict) -> tuple[nn.Module | None, str | None]:
    """The block's own output norm (the module, reused as it is, and its name), if it has one."""
    name = structure.get("post_norm")
    return (None, None) if name is None else (mlp.get_submodule(name), name)


def build_layer(config, structure: dict, layer: nn.Module, spec: dict) -> dict[str, nn.Module]:
    """Empty replacement modules for one changed layer, by path under the layer (weights load later);
    a whole-block replacement returns (output, None) where the family's block returns a pair."""
    modules = _build_layer(config, structure, layer, spec)
    if structure.get("returns_tuple") and structure["mlp"] in modules and spec["action"] in ("condense", "drop"):
        modules[structure["mlp"]].returns_tuple = True
    return modules


def _build_layer(config, structure: dict, layer: nn.Module, spec: dict) -> dict[str, nn.Module]:
    """Empty replacement modules for one changed layer, by path under the layer (weights load later).

    Built in the ambient device/dtype (meta while transformers loads a checkpoint). A pruned layer
    with ModuleList experts reuses the layer's first expert modules (same shapes; they get the kept
    experts' weights) and puts a `ConstantExpert` at each novice slot.
    """
    mlp_path = structure["mlp"]
    action = spec["action"]
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if action == "drop":
        # a block on the layer itself (empty path), or one whose router hands state on ("routed"), keeps
        # its router; its experts give 0
        if spec.get("form") == "routed":
            return {module_path(mlp_path, structure["experts"]): DroppedMLP()}
        return {mlp_path or structure["experts"]: DroppedMLP()}
    if action == "condense" and spec.get("form") == "routed":  # the block keeps its router and shared experts
        old = layer.get_submodule(module_path(mlp_path, structure["experts"]))
        experts = type(old)(sized_config(getattr(old, "config", config), structure["num_experts_key"], spec["experts"]))
        if hasattr(old, "config"):
            experts.config = old.config
        return {module_path(mlp_path, structure["experts"]): FixedWeightExperts(experts, spec["experts"])}
    if action == "condense" and spec.get("form") == "experts":
        mlp = layer.get_submodule(mlp_path)
        old = mlp.get_submodule(structure["experts"])
        sized = sized_config(getattr(old, "config", config), structure["num_experts_key"], spec["experts"])
        experts = type(old)(sized)
        if hasattr(old, "config"):
            experts.config = old.config
        shared = mlp.get_submodule(structure["shared"]) if spec["shared"] else None
        shared_gate = mlp.get_submodule(structure["shared_gate"]) if spec["shared_gate"] else None
        post_norm = _block_post_norm(mlp, structure)
        return {mlp_path: CondensedExperts(experts, spec["experts"], shared, shared_gate, *post_norm)}
    if action == "condense":
        module = CondensedMLP(
            config.hidden_size,
            spec["shared_rows"],
            spec["routed_rows"],
            spec["hidden_act"],
            spec["shared_gate"],
            spec.get("gated", True),
            *_block_post_norm(layer.get_submodule(mlp_path), structure),
            output_bias=spec.get("output_bias", False),
        )
        return {mlp_path: module}
    if action != "prune":
        raise ValueError(f"moepress_structure: unknown action {action!r}")
    mlp = layer.get_submodule(mlp_path)
    if "expert_map" in spec:  # every router row stays (the router is not rebuilt); E' stored experts
        old = mlp.get_submodule(structure["experts"])
        kept = type(old)(sized_config(config, structure["num_experts_key"], len(spec["experts"])))
        if hasattr(old, "config"):
            kept.config = old.config  # model.set_experts_implementation(...) still reaches it
        return {module_path(mlp_path, structure["experts"]): MappedExperts(kept, spec["expert_map"])}
    active, novices = spec["experts"], set(spec["novices"])
    novice_slots = [s for s, e in enumerate(active) if e in novices]
    n_kept = len(active) - len(novice_slots)
    key = structure["num_experts_key"]
    router = _sized(mlp, structure["router"], config, structure, len(active))
    parts = structure.get("expert_parts")
    if parts:  # the experts live in several modules of the block, run in sequence
        modules = {module_path(mlp_path, structure["router"]): router}
        for j, part in enumerate(parts):
            kept = _sized(mlp, part, config, structure, n_kept)
            if novice_slots:
                last = j == len(parts) - 1
                kept = SplitNoviceExperts(kept, novice_slots, len(active), config.hidden_size if last else None)
            modules[module_path(mlp_path, part)] = kept
        return modules
    old = mlp.get_submodule(structure["experts"])
    if isinstance(old, nn.ModuleList):
        reused = iter(list(old)[:n_kept])
        experts: nn.Module = nn.ModuleList(
            [
                ConstantExpert(config.hidden_size) if s in novice_slots else next(reused)
                for s in range(len(active))
            ]
        )
    else:
        experts = type(old)(sized_config(config, key, n_kept))
        if hasattr(old, "config"):
            # share the model's config so model.set_experts_implementation(...) still reaches it
            experts.config = old.config
        if novice_slots:
            experts = NoviceExperts(experts, novice_slots, config.hidden_size)
    return {module_path(mlp_path, structure["router"]): router, module_path(mlp_path, structure["experts"]): experts}


def _sized(mlp: nn.Module, path: str, config, structure: dict, n: int) -> nn.Module:
    """An empty module of the block's class at `path`, for n experts: built from the config by its own
    class, or, where that class takes sizes (`structure['sized_by_block']`), taken from the family's
    block built at n experts."""
    sized = sized_config(config, structure["num_experts_key"], n)
    if structure.get("sized_by_block"):
        return type(mlp)(sized).get_submodule(path)
    old = mlp.get_submodule(path)
    if type(old) is nn.Linear:  # a plain router, one output per expert (Jamba's before transformers 5.21)
        return nn.Linear(old.in_features, n, bias=old.bias is not None)
    # a class that also takes the layer index (ZAYA's router) gets the one of the module it replaces
    takes_index = "layer_idx" in inspect.signature(type(old)).parameters and hasattr(old, "layer_idx")
    return type(old)(sized, layer_idx=old.layer_idx) if takes_index else type(old)(sized)


def set_block_tensors(
    layer: nn.Module, structure: dict, spec: dict, values: dict[str, torch.Tensor] | None = None
) -> None:
    """Resize the per-expert tensors that the MoE block owns itself (HunYuan-V3's and LFM2-MoE's choice
    bias live on the block, not the router) to the pruned layer's experts: `values` when given (surgery),
    else empty tensors of the new size for the checkpoint's weights to load into."""
    mlp = layer.get_submodule(structure["mlp"])
    n = len(spec["experts"])
    for name in spec.get("block_tensors", []):
        old = getattr(mlp, name)
        if values is not None:
            new = values[name]
        else:
            new = torch.empty((n, *old.shape[1:]), dtype=old.dtype, device=old.device)
        if isinstance(old, nn.Parameter):
            setattr(mlp, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            persistent = name not in mlp._non_persistent_buffers_set
            mlp.register_buffer(name, new, persistent=persistent)


def apply_structure(model: nn.Module, structure: dict) -> None:
    """Rebuild every layer that `structure` lists into its compressed shape, in place."""
    if structure.get("version") != STRUCTURE_VERSION:
        raise ValueError(
            f"moepress_structure version {structure.get('version')} is not {STRUCTURE_VERSION}; "
            "load this checkpoint with the moepress version that wrote it"
        )
    layers = model.get_submodule(structure["layers_path"])
    for idx, spec in structure["layers"].items():
        layer = layers[int(idx)]
        for path, module in build_layer(model.config, structure, layer, spec).items():
            layer.set_submodule(path, module)
        if spec["action"] == "prune" and "expert_map" not in spec:
            set_block_tensors(layer, structure, spec)
