"""What every family's vLLM model class shares: the per-layer plan, the changed layers built from vLLM's own
layers, and the weight-name mapping from moepress's checkpoint layout onto them.

A family (one file per family beside this one) names vLLM's model module, the MoE block class its decoder
layer calls, and how to build that block at another expert count. `CompressedMoEModel.__init__` then swaps the
module-level block class for a factory while the stock model builds itself, so every changed layer is built
once, under its own prefix (vLLM registers fused-MoE layers by prefix: building and replacing would register
two). The swap is undone in `finally`.

Layer kinds (from `config.moepress_structure`, or from `config.approximate_experts` on a vLLM that lacks
expert substitution):
- moe: the family's block at `n_slots` router rows; novice slots (if any) are constant vectors, routed
  exactly as vLLM 0.33's `ConstantExpertSubstitution` does (routing over all rows as the family computes it,
  no renormalisation; a route to a novice adds weight x vector and runs no expert GEMM); a merged layer that
  keeps all its router rows (`expert_map`) routes over all rows as the family does and then sends each chosen
  row to its stored expert, the weights of rows of one stored expert adding up on it (`MergedRoutes`);
- condense: one dense gated MLP of the condensed width (+ Qwen2-MoE's shared-expert sigmoid gate on the
  shared rows);
- drop: zero output, the decoder layer keeps its residual.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.models.utils import extract_layer_index

from moepress.errors import MoepressError
from moepress.serving.versions import check_vllm_version, has_native_substitution

APPROX_VALUE = "approx_value"


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer's MoE block becomes in vLLM."""

    kind: str  # "moe", "condense" or "drop"
    n_slots: int = 0  # router rows (moe)
    novices: tuple[int, ...] = ()  # novice slot ids, ascending (moe)
    spec: dict = field(default_factory=dict)  # the structure's entry (condense)
    expert_map: tuple[int, ...] = ()  # router row -> stored expert, for a merge keeping every row (moe)

    @property
    def kept_slots(self) -> list[int]:
        """The ids the stored experts go under in vLLM, in the order the checkpoint stores them."""
        if self.expert_map:
            return list(range(max(self.expert_map) + 1))
        novices = set(self.novices)
        return [s for s in range(self.n_slots) if s not in novices]


def layer_plans(config: Any, num_experts_key: str, native_on_old_vllm: bool) -> dict[int, LayerPlan]:
    """The changed layers of `config` (empty for an unchanged model); raises before any weight loads when the
    checkpoint names something the plugin cannot build. `native_on_old_vllm`: read `approximate_experts` too
    (the vLLM in use does not)."""
    structure = getattr(config, "moepress_structure", None)
    approximate = getattr(config, "approximate_experts", None) if native_on_old_vllm else None
    if structure is not None and approximate is not None:
        raise MoepressError(
            "config has both moepress_structure and approximate_experts; it was not written by moepress"
        )
    if structure is not None:
        return {int(i): _structure_plan(int(i), spec) for i, spec in structure["layers"].items()}
    if approximate is None:
        return {}
    n = getattr(config, num_experts_key)
    plans = {}
    for layer, ids in approximate.items():
        ids = sorted({int(e) for e in ids})
        if any(not 0 <= e < n for e in ids):
            raise MoepressError(f"approximate_experts of layer {layer} names experts {ids}: outside [0, {n})")
        if len(ids) == n:
            raise MoepressError(f"approximate_experts of layer {layer} replaces all {n} experts; keep at least one")
        if ids:
            plans[int(layer)] = LayerPlan("moe", n, tuple(ids))
    return plans


def _structure_plan(layer: int, spec: dict) -> LayerPlan:
    action = spec.get("action")
    if action == "drop" and spec.get("form") is None:
        return LayerPlan("drop")
    if action == "condense" and spec.get("form") is None:
        if not spec.get("gated", True) or spec.get("hidden_act") != "silu" or spec.get("output_bias"):
            raise MoepressError(f"layer {layer}: the plugin serves condensed layers of gated SiLU MLPs only: {spec}")
        return LayerPlan("condense", spec=spec)
    if action == "prune" and "expert_map" in spec:
        routes, n_stored = [int(p) for p in spec["expert_map"]], len(spec["experts"])
        if sorted(set(routes)) != list(range(n_stored)):
            raise MoepressError(f"layer {layer}: expert_map {routes} does not reach each of its {n_stored} experts")
        return LayerPlan("moe", len(routes), expert_map=tuple(routes))
    if action == "prune" and not spec.get("block_tensors"):
        active, novices = spec["experts"], set(spec["novices"])
        if not novices <= set(active):
            raise MoepressError(f"layer {layer}: novices {sorted(novices)} are not among its experts {active}")
        slots = tuple(s for s, e in enumerate(active) if e in novices)
        if len(slots) == len(active):
            raise MoepressError(f"layer {layer}: every expert is a novice; the plugin needs one real expert per layer")
        return LayerPlan("moe", len(active), slots)
    raise MoepressError(f"layer {layer}: the moepress vLLM plugin does not serve this layer kind: {spec}")


# ---------------------------------------------------------------- novices (backport of vLLM 0.33's substitution)


class ConstantExperts(nn.Module):
    """The novices of one MoE layer: a constant vector per novice slot, and the route remapping that lets the
    fused-MoE kernel run only the kept experts (vLLM 0.33's `ConstantExpertSubstitution`, for 0.32)."""

    def __init__(self, layer: int, n_slots: int, novices: tuple[int, ...], hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.layer = layer
        self.novices = novices
        kept = [s for s in range(n_slots) if s not in set(novices)]
        routes = [0] * n_slots  # kept slot -> its physical row, novice -> -1 - its row in `values`
        for row, slot in enumerate(kept):
            routes[slot] = row
        for row, slot in enumerate(novices):
            routes[slot] = -1 - row
        self.routes = routes
        self.register_buffer("route_table", torch.tensor(routes, dtype=torch.int64), persistent=False)
        # NaN until loaded, so a checkpoint missing a vector fails loudly
        self.values = nn.Parameter(torch.full((len(novices), hidden_size), torch.nan, dtype=dtype), requires_grad=False)

    def load(self, slot: int, tensor: torch.Tensor) -> None:
        row = self.routes[slot] if 0 <= slot < len(self.routes) else 0
        if row >= 0:
            raise MoepressError(f"layer {self.layer}: {APPROX_VALUE} for expert {slot}, which is not a novice")
        self.values.data[-1 - row].copy_(tensor)

    def check_loaded(self) -> None:
        missing = [self.novices[r] for r in torch.isnan(self.values).any(dim=1).nonzero().flatten().tolist()]
        if missing:
            raise MoepressError(
                f"layer {self.layer}: the checkpoint has no {APPROX_VALUE} for novice experts {missing}"
            )

    def transform_routes(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Remap routes in place (novice routes -> weight 0 on row 0) and return the novices' output."""
        valid = (topk_ids >= 0) & (topk_ids < len(self.routes))
        routes = self.route_table[torch.where(valid, topk_ids, torch.zeros_like(topk_ids)).long()]
        novice = valid & (routes < 0)
        n = self.values.shape[0]
        scales = torch.zeros(topk_ids.shape[0], n + 1, dtype=torch.float32, device=x.device)
        scales.scatter_add_(1, torch.where(novice, -1 - routes, n), topk_weights.float())
        out = (scales[:, :n] @ self.values.float()).to(x.dtype)
        topk_weights.masked_fill_(~valid | novice, 0.0)
        topk_ids.copy_(routes.clamp_min(0).to(topk_ids.dtype))
        return out


class SubstitutedRoutedExperts(RoutedExperts):
    """Routed experts holding only the kept experts; the checkpoint names them by router slot."""

    def __init__(self, *args: Any, expert_substitution: ConstantExperts, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.expert_substitution = expert_substitution

    def _map_global_expert_id_to_local_expert_id(self, expert_id: int) -> int:
        row = self.expert_substitution.routes[expert_id] if expert_id < len(self.expert_substitution.routes) else -1
        return -1 if row < 0 else super()._map_global_expert_id_to_local_expert_id(row)

    def get_expert_mapping(self, ckpt_gate_proj_name=None, ckpt_down_proj_name=None, ckpt_up_proj_name=None, **_):
        return self.build_expert_params_mapping(
            ckpt_gate_proj_name or self.ckpt_gate_proj_name,
            ckpt_down_proj_name or self.ckpt_down_proj_name,
            ckpt_up_proj_name or self.ckpt_up_proj_name,
            num_experts=len(self.expert_substitution.routes),
            routed_experts_prefix="",
        )

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        constant = self.expert_substitution.transform_routes(x, topk_weights, topk_ids)
        out = super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)
        if not isinstance(out, torch.Tensor):
            raise MoepressError("novice experts do not support deferred MoE finalize (multi-GPU all2all)")
        # replicated on every tensor-parallel rank, whose partial outputs are summed later
        if self.moe_config.tp_rank == 0:
            out.add_(constant[..., : out.shape[-1]])
        return out


def novice_factory(real: Callable[..., nn.Module], plan: LayerPlan, layer: int) -> Callable[..., nn.Module]:
    """`FusedMoEFactory` for a layer with novices: routes over all `plan.n_slots` rows, allocates the kept."""

    def factory(*args: Any, num_experts: int, hidden_size: int, params_dtype=None, **kwargs: Any) -> nn.Module:
        dtype = params_dtype or torch.get_default_dtype()
        sub = ConstantExperts(layer, num_experts, plan.novices, hidden_size, dtype)
        kwargs["routed_experts_cls"] = SubstitutedRoutedExperts
        kwargs["routed_experts_args"] = {**(kwargs.get("routed_experts_args") or {}), "expert_substitution": sub}
        n_kept = num_experts - len(plan.novices)
        return real(*args, num_experts=n_kept, hidden_size=hidden_size, params_dtype=params_dtype, **kwargs)

    return factory


# ---------------------------------------------------------------- merged experts behind all router rows


class MergedRoutes(nn.Module):
    """The map of one merged layer from router row to stored expert (`expert_map`), applied to the routes the
    family's router chose over all its rows: each row becomes its stored expert, and where a token chose
    several rows of one stored expert their weights add up on the first such slot (the others keep the id at
    weight 0), which is what the same router would give with the members' experts all holding the merged
    weights."""

    def __init__(self, layer: int, expert_map: tuple[int, ...]):
        super().__init__()
        self.layer = layer
        self.register_buffer("route_table", torch.tensor(expert_map, dtype=torch.int64), persistent=False)

    def transform_routes(self, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> None:
        """Remap `topk_ids` to stored experts and merge the weights of repeated ones, in place."""
        ids = self.route_table[topk_ids.long().clamp(0, self.route_table.numel() - 1)]
        same = ids[:, :, None] == ids[:, None, :]
        repeat = (same & torch.ones_like(same[0]).tril(-1)).any(dim=-1)
        summed = (same.to(torch.float32) * topk_weights.float()[:, None, :]).sum(dim=-1)
        merged = torch.where(same.sum(dim=-1) > 1, summed.to(topk_weights.dtype), topk_weights)
        topk_weights.copy_(merged.masked_fill(repeat, 0.0))
        topk_ids.copy_(ids.to(topk_ids.dtype))


class MappedRoutedExperts(RoutedExperts):
    """Routed experts holding a merged layer's stored experts, reached from every router row (`MergedRoutes`)."""

    def __init__(self, *args: Any, merged_routes: MergedRoutes, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.merged_routes = merged_routes

    def forward_modular(self, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        self.merged_routes.transform_routes(topk_weights, topk_ids)
        return super().forward_modular(x, topk_weights, topk_ids, shared_experts, shared_experts_input)


def mapped_factory(real: Callable[..., nn.Module], plan: LayerPlan, layer: int) -> Callable[..., nn.Module]:
    """`FusedMoEFactory` for a merged layer keeping every router row: routes over `plan.n_slots` rows, allocates
    the stored experts only."""

    def factory(*args: Any, num_experts: int, **kwargs: Any) -> nn.Module:
        routes = MergedRoutes(layer, plan.expert_map)
        kwargs["routed_experts_cls"] = MappedRoutedExperts
        kwargs["routed_experts_args"] = {**(kwargs.get("routed_experts_args") or {}), "merged_routes": routes}
        return real(*args, num_experts=len(plan.kept_slots), **kwargs)

    return factory


# ---------------------------------------------------------------- condensed and dropped layers


class CondensedMLP(nn.Module):
    """A condensed MoE block: one gated SiLU MLP (`down(silu(gate x) * up x)`) of the condensed width; with a
    shared gate, the first `shared_rows` intermediate rows are scaled by `sigmoid(shared_gate x)` first
    (Qwen2-MoE's gated shared expert, folded in). Replicated on every rank: its width is small."""

    def __init__(self, hidden_size: int, spec: dict, prefix: str):
        super().__init__()
        rows = spec["shared_rows"] + spec["routed_rows"]
        self.shared_rows = spec["shared_rows"]
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [rows] * 2, bias=False, disable_tp=True, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(rows, hidden_size, bias=False, disable_tp=True, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()
        self.shared_gate = (
            ReplicatedLinear(hidden_size, 1, bias=False, prefix=f"{prefix}.shared_gate")
            if spec["shared_gate"]
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act_fn(self.gate_up_proj(x)[0])
        if self.shared_gate is not None:
            gate = torch.sigmoid(self.shared_gate(x)[0])
            h = torch.cat([h[..., : self.shared_rows] * gate, h[..., self.shared_rows :]], dim=-1)
        return self.down_proj(h)[0]

    def load(self, name: str, tensor: torch.Tensor) -> str:
        """Load the checkpoint tensor `name` (relative to the block); return the parameter's name."""
        target, shard = {
            "gate_proj.weight": ("gate_up_proj.weight", 0),
            "up_proj.weight": ("gate_up_proj.weight", 1),
            "down_proj.weight": ("down_proj.weight", None),
            "shared_gate.weight": ("shared_gate.weight", None),
        }[name]
        param = self.get_parameter(target)
        if shard is None:
            param.weight_loader(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)
        return target


class ZeroMLP(nn.Module):
    """A dropped MoE block (or one condensed to no rows): adds nothing to the residual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


# ---------------------------------------------------------------- the family description and the model mixin


@dataclass(frozen=True)
class Family:
    """What the shared machinery needs to know about one vLLM model family."""

    module: ModuleType  # vLLM's model module (its globals are swapped while the model builds)
    block: str  # the MoE block class the decoder layer calls, by name in `module`
    sized_block: Callable[[Callable[..., nn.Module], int, tuple, dict], nn.Module]  # the block at n experts
    num_experts_key: str = "num_experts"
    mlp: str = "mlp"  # the block's name under the decoder layer, in the checkpoint and in vLLM
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert tensors on disk
    factory: str = "FusedMoEFactory"  # the fused-MoE constructor's name in `module`


def sized_by_config(key: str = "num_experts") -> Callable[..., nn.Module]:
    """`Family.sized_block` for a block built from `config=` (Qwen2-MoE): a copy of the config at n experts."""

    def build(block: Callable[..., nn.Module], n: int, args: tuple, kwargs: dict) -> nn.Module:
        config = copy.copy(kwargs["config"])
        setattr(config, key, n)
        return block(*args, **{**kwargs, "config": config})

    return build


def sized_by_text_config(key: str = "num_experts") -> Callable[..., nn.Module]:
    """`Family.sized_block` for a block that reads the model's text config from `vllm_config=` (Qwen3-MoE): the
    config says n experts while the block builds (the block keeps its counts; nothing reads them later)."""

    def build(block: Callable[..., nn.Module], n: int, args: tuple, kwargs: dict) -> nn.Module:
        config = kwargs["vllm_config"].model_config.hf_text_config
        with swapped(config, key, n):
            return block(*args, **kwargs)

    return build


def sized_by_argument(name: str = "num_experts") -> Callable[..., nn.Module]:
    """`Family.sized_block` for a block that takes its expert count as an argument (OLMoE)."""

    def build(block: Callable[..., nn.Module], n: int, args: tuple, kwargs: dict) -> nn.Module:
        return block(*args, **{**kwargs, name: n})

    return build


@contextlib.contextmanager
def swapped(owner: Any, name: str, value: Any) -> Iterator[None]:
    """`owner.name` (a module's global, a config's field) is `value` inside the block, and what it was after."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


class _FactoryMeta(type):
    """Calling the class builds through `build`; `isinstance` answers for the family's block class, so the
    model's own checks (`isinstance(layer.mlp, Qwen3MoeSparseMoeBlock)` to collect its MoE layers) still
    work while the swap is in place."""

    def __call__(cls, *args: Any, **kwargs: Any) -> nn.Module:
        return cls.build(*args, **kwargs)

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, cls.block)


def _Factory(block: type[nn.Module], build: Callable[..., nn.Module]) -> type:
    """A stand-in for the family's block class (see `_FactoryMeta`) under the same name."""
    return _FactoryMeta(block.__name__, (), {"block": block, "build": staticmethod(build)})


_LAYER = re.compile(r"^(?P<prefix>.*?layers\.(?P<layer>\d+)\.)(?P<rest>.*)$")
# the plan's novice sidecar (`moepress_plan.novices.safetensors`), which vLLM reads as one more weight file
_SIDECAR = re.compile(r"^layers\.\d+\.novices\.\d+$")


class CompressedMoEModel(nn.Module):
    """Mixin before a family's vLLM ForCausalLM: builds the changed layers and maps moepress's tensor names.

    With no changed layer (a plain checkpoint under a taken-over source architecture) it builds and loads
    exactly as the stock class."""

    family: Family
    native_architecture = False  # registered under the source architecture (approximate_experts on old vLLM)

    def __init__(self, *, vllm_config: Any, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        self.__dict__["_moepress_plans"] = plans = layer_plans(
            config, self.family.num_experts_key, native_on_old_vllm=not has_native_substitution()
        )
        if not plans:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            return
        check_vllm_version("approximate_experts" if self.native_architecture else "moepress")
        block = getattr(self.family.module, self.family.block)
        built: set[int] = set()
        with swapped(self.family.module, self.family.block, _Factory(block, self._block_factory(block, config, built))):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        outside = sorted(set(plans) - built)
        if outside:
            raise MoepressError(f"the checkpoint changes layer {outside[0]}, which has no MoE block in this model")

    def _block_factory(self, block: type[nn.Module], config: Any, built: set[int]) -> Callable[..., nn.Module]:
        """The family's block class while the model builds: a changed layer (recorded in `built`) as planned."""
        family, plans = self.family, self._moepress_plans

        def build(*args: Any, **kwargs: Any) -> nn.Module:
            layer = extract_layer_index(kwargs["prefix"])
            plan = plans.get(layer)
            if plan is None:
                return block(*args, **kwargs)
            built.add(layer)
            if plan.kind == "drop" or (
                plan.kind == "condense" and not plan.spec["shared_rows"] + plan.spec["routed_rows"]
            ):
                return ZeroMLP()
            if plan.kind == "condense":
                return CondensedMLP(config.hidden_size, plan.spec, kwargs["prefix"])
            real = getattr(family.module, family.factory)
            if plan.expert_map:
                factory = mapped_factory(real, plan, layer)
            else:
                factory = novice_factory(real, plan, layer) if plan.novices else real
            with swapped(family.module, family.factory, factory):
                return family.sized_block(block, plan.n_slots, args, kwargs)

        return build

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        plans = self._moepress_plans
        if not plans:
            return super().load_weights(weights)
        loaded: set[str] = set()
        blocks = {name: m for name, m in self.named_modules() if isinstance(m, CondensedMLP | ZeroMLP)}
        novices = {m.layer: (name, m) for name, m in self.named_modules() if isinstance(m, ConstantExperts)}
        # the block's name in vLLM, and in moepress's own tensors (transformers' name: Mixtral's `mlp`)
        structure = getattr(self.config, "moepress_structure", None) or {}
        block_names = {self.family.mlp, structure.get("mlp", self.family.mlp)}

        def stock_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if _SIDECAR.match(name):
                    continue
                match = _LAYER.match(name)
                plan = plans.get(int(match["layer"])) if match else None
                head, _, rest = match["rest"].partition(".") if match else ("", "", "")
                if plan is None or head not in block_names:
                    yield name, tensor
                    continue
                block = match["prefix"] + self.family.mlp
                if block in blocks:
                    if isinstance(blocks[block], CondensedMLP):
                        loaded.add(f"{block}.{blocks[block].load(rest, tensor)}")
                    continue
                yield from self._expert_weights(block, rest, tensor, plan, novices, loaded)

        result = super().load_weights(stock_weights())
        for _, substitution in novices.values():
            substitution.check_loaded()
        return set(result) | loaded

    def _expert_weights(
        self,
        block: str,
        rest: str,
        tensor: torch.Tensor,
        plan: LayerPlan,
        novices: dict[int, tuple[str, ConstantExperts]],
        loaded: set[str],
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """One tensor of a kept-size MoE block, in the family's per-expert on-disk names by router slot:
        moepress's fused `experts[.kept].gate_up_proj`/`down_proj` split per expert, its `experts.novices` and
        the native `experts.<slot>.approx_value` into the novice vectors, anything else unchanged."""
        gate, up, down = self.family.expert_names
        experts = f"{block}.experts"
        layer = int(_LAYER.match(block)["layer"])
        kept = plan.kept_slots
        if rest in ("experts.novices", "experts.kept.novices") or rest.endswith("." + APPROX_VALUE):
            if layer not in novices:
                raise MoepressError(f"{block}: the checkpoint has novice vectors but the config lists no novices")
            name, substitution = novices[layer]
            if rest.endswith(APPROX_VALUE):
                substitution.load(int(rest.split(".")[-2]), tensor)
            else:
                for row, slot in enumerate(plan.novices):
                    substitution.load(slot, tensor[row])
            loaded.add(f"{name}.values")
        elif rest in ("experts.kept.gate_up_proj", "experts.gate_up_proj") and tensor.dim() == 3:
            for row, slot in enumerate(kept):
                g, u = tensor[row].chunk(2, dim=0)
                yield f"{experts}.{slot}.{gate}.weight", g
                yield f"{experts}.{slot}.{up}.weight", u
        elif rest in ("experts.kept.down_proj", "experts.down_proj") and tensor.dim() == 3:
            for row, slot in enumerate(kept):
                yield f"{experts}.{slot}.{down}.weight", tensor[row]
        else:
            yield f"{block}.{rest}", tensor
