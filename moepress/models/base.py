"""The MoEBlock view every method sees, whatever the model family, and the adapter registry.

An adapter (one file per family in this package) turns a decoder layer's MoE MLP into a `MoEBlock`:
router, routing rule, routed experts by id, shared experts and their gate. The view holds
references to the live modules; it never copies weights. `MoEBlock.forward` re-implements the
family's block so that methods can run it under a per-layer plan action (keep / prune / condense /
drop) without rebuilding the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moepress.errors import MoepressError
from moepress.models.transformers_moe import NO_ADAPTER_YET, check_model_type, is_transformers_moe
from moepress.modules.model_type import source_model_type


class BlockAction(Protocol):
    """What a block reads of a plan action (`moepress.plan`'s Keep / Prune / Condense / Drop, one layer
    of a `CompressionPlan`): its kind, then that kind's fields (`keep_experts`/`novices` of a prune,
    `experts`/`weights`/`keep_shared` of a condense). A protocol, so that the view every method sees
    does not import the plan that is made from it."""

    action: str


@dataclass(frozen=True)
class Routing:
    """How a family's router turns logits into top-k expert weights."""

    scoring: Literal["softmax", "sigmoid"]
    top_k: int
    norm_topk: bool
    scaling: float = 1.0
    # Group-limited routing (DeepSeek-V2 "group_limited_greedy", DeepSeek-V3 "noaux_tc").
    n_group: int | None = None
    topk_group: int | None = None
    group_score: Literal["max", "top2sum"] | None = None
    # Qwen/OLMoE compute logits in the activations' dtype; DeepSeek casts to float32 first.
    logits_in_fp32: bool = True
    # Qwen/OLMoE cast the top-k weights back to the logits' dtype before use.
    weights_to_logits_dtype: bool = False
    # DeepSeek-V3 adds 1e-20 to the renormalisation denominator.
    norm_eps: float = 0.0
    # ERNIE-4.5 clamps the renormalisation denominator from below instead.
    norm_min: float = 0.0


@dataclass
class RouteResult:
    logits: torch.Tensor  # [N, E_active] float32 router logits
    scores: torch.Tensor  # [N, E_active] float32 softmax/sigmoid scores
    weights: torch.Tensor  # [N, k] gate weights as the family applies them (post top-k, renorm, scaling)
    index: torch.Tensor  # [N, k] expert ids in the ORIGINAL numbering


class ExpertStore:
    """Routed experts as gate/up/down matrices by expert id, whatever the storage."""

    # per-expert tensors of the experts module besides the weights and biases (names in its state dict)
    # that span the hidden dimension only, as a per-expert output norm's scale: neuron alignment, which
    # permutes intermediate rows, leaves them as they are, so merges with alignment average them as well
    hidden_side_tensors: tuple[str, ...] = ()

    def __init__(self, module: nn.Module, act_fn):
        self.module = module
        self.act_fn = act_fn

    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of expert `e`, as views of the live parameters."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Unweighted output of expert `e` on tokens x [N, H]."""
        gate, up, down = self.weights(e)
        return F.linear(self.act_fn(F.linear(x, gate)) * F.linear(x, up), down)

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Unweighted outputs [S, H] for tokens x [S, H] sorted by expert: the first counts[0] rows
        go to expert 0, the next counts[1] to expert 1, and so on.

        This default runs `forward` on each expert's contiguous slice (one host sync for the
        counts), so every storage gets it; storages with stacked weights override it with one
        grouped GEMM, which is what makes calibration fast.
        """
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = self.forward(x[start : start + n], e)
            start += n
        return out


def _grouped_mm_by_slices(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [S, K] @ weight[e] [K, N] on each expert's rows (ends at `offsets`): the fallback of
    `_grouped_mm` where transformers' dispatcher is missing."""
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        torch.mm(x[start:end], weight[e], out=out[start:end])
        start = end
    return out


try:  # the dispatcher transformers' own `grouped_mm` experts path uses: the same kernel, so the same bits
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # pragma: no cover - older or newer transformers
    _grouped_mm = _grouped_mm_by_slices


class FusedExperts(ExpertStore):
    """transformers v5 storage: `gate_up_proj [E, 2I, H]` (gate rows first) and `down_proj [E, H, I]`."""

    @property
    def num_experts(self) -> int:
        return self.module.gate_up_proj.shape[0]

    def weights(self, e: int):
        gate_up = self.module.gate_up_proj[e]
        inter = gate_up.shape[0] // 2
        return gate_up[:inter], gate_up[inter:], self.module.down_proj[e]

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        # Same op order as the transformers eager path, so outputs match to the last bit.
        gate, up = F.linear(x, self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.module.down_proj[e])

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        if type(self).forward is not FusedExperts.forward or x.dtype == torch.float64:
            # a subclass with another layout follows its own forward; grouped GEMMs take no float64
            return super().grouped_forward(x, counts)
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = _grouped_mm(x, self.module.gate_up_proj.transpose(-2, -1), offsets).chunk(2, dim=-1)
        return _grouped_mm(self.act_fn(gate) * up, self.module.down_proj.transpose(-2, -1), offsets)


class TransformersExperts(ExpertStore):
    """Any experts class declared with transformers' `use_experts_implementation`, read through the
    layout flags that decorator sets on the instance (`has_gate`, `is_concatenated` (else gate/up
    rows interleaved), `is_transposed`, `has_bias`, `has_post_expert_norm`).

    `forward` calls the family's own experts module with every token routed to `e` at weight 1, so a
    family's custom activation (gpt-oss's clamped SwiGLU), biases and post-expert norm are exactly
    the family's; `weights(e)` gives the canonical (gate [I, H] or None, up [I, H], down [H, I])
    views that condensing and merging need.
    """

    def __init__(self, module: nn.Module):
        super().__init__(module, getattr(module, "act_fn", None))

    @property
    def gated(self) -> bool:
        return bool(getattr(self.module, "has_gate", True))

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    def _matrix(self, name: str, e: int) -> torch.Tensor:
        w = getattr(self.module, name)[e]
        return w.T if getattr(self.module, "is_transposed", False) else w

    def weights(self, e: int):
        down = self._matrix("down_proj", e)
        if not self.gated:
            return None, self._matrix("up_proj", e), down
        gate_up = self._matrix("gate_up_proj", e)
        if getattr(self.module, "is_concatenated", True):
            inter = gate_up.shape[0] // 2
            return gate_up[:inter], gate_up[inter:], down
        return gate_up[0::2], gate_up[1::2], down

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None:
        """(gate, up, down) biases of expert e, or None when the experts have no bias."""
        if not getattr(self.module, "has_bias", False):
            return None
        down = self.module.down_proj_bias[e]
        if not self.gated:
            return None, self.module.up_proj_bias[e], down
        gate_up = self.module.gate_up_proj_bias[e]
        if getattr(self.module, "is_concatenated", True):
            inter = gate_up.shape[0] // 2
            return gate_up[:inter], gate_up[inter:], down
        return gate_up[0::2], gate_up[1::2], down

    @property
    def is_plain_mlp(self) -> bool:
        """True when each expert is `down(act(gate x) * up x)` (or `down(act(up x))`): no bias, no
        custom gating, no post-expert norm, so a dense MLP of its rows reproduces it."""
        from transformers.integrations.moe import _default_apply_gate

        m = self.module
        custom_gate = getattr(type(m), "_apply_gate", _default_apply_gate) is not _default_apply_gate
        return not (getattr(m, "has_bias", False) or getattr(m, "has_post_expert_norm", False) or custom_gate)

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        n = x.shape[0]
        index = torch.full((n, 1), e, dtype=torch.long, device=x.device)
        ones = torch.ones((n, 1), dtype=x.dtype, device=x.device)
        return self.module(x, index, ones)

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # one call of the family's own experts implementation (grouped GEMM where configured), each
        # row routed to its expert at weight 1: exact, and no per-expert Python loop
        index = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts.to(x.device))
        ones = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
        return self.module(x, index[:, None], ones)


class ListExperts(ExpertStore):
    """Remote-code storage (DeepSeekMoE-16B style): a ModuleList of MLPs with gate/up/down_proj."""

    @property
    def num_experts(self) -> int:
        return len(self.module)

    def weights(self, e: int):
        mlp = self.module[e]
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.module[e](x)


@dataclass
class MoEBlock:
    """One MoE MLP seen uniformly. `module` is the live block; everything else points into it."""

    layer_idx: int
    module: nn.Module
    router_weight: nn.Parameter  # [E, H]
    routing: Routing
    experts: ExpertStore
    shared: nn.Module | None = None  # one gated MLP holding all shared experts' rows
    shared_gate: nn.Linear | None = None  # Qwen2-MoE: sigmoid(shared_gate(x)) scales the shared output
    correction_bias: torch.Tensor | None = None  # DeepSeek-V3: added to scores for choice only
    router_bias: torch.Tensor | None = None  # gpt-oss: logits = x W^T + b
    returns_tuple: bool = False  # gpt-oss, Llama-4: the block returns (output, router scores)

    # why a novice (a constant output) cannot stand in for an expert of this block; empty: it can
    novice_refusal = ""

    @property
    def supports_novices(self) -> bool:
        return not self.novice_refusal

    @property
    def mapping_refusal(self) -> str:
        """Why this block cannot keep all its router rows over fewer stored experts (a merge whose
        members all route to the merged expert, `Prune.router_rows="all"`); empty: it can. The map sits
        between the router and the experts module, so the experts must be one module the block calls
        as `experts(hidden_states, top_k_index, top_k_weights)`; a family whose block calls its experts
        otherwise says why here (a class attribute of its block)."""
        if self.expert_parts:
            return "its experts are several modules run in sequence on rows sorted by router row"
        if isinstance(self.experts.module, nn.ModuleList):
            return "its experts are a list of modules the block indexes by router row"
        return ""
    # router rows after the E routed experts' rows that score something else (Inkling's shared experts,
    # LongCat-Flash's identity experts): a pruned router must keep them, after the kept experts' rows
    extra_router_rows = 0
    # keyword arguments the model passes the block that its routed output does not depend on (calibration's
    # fused path runs without them)
    ignored_call_arguments = ()  # tuple[str, ...]; a class attribute, not a dataclass field
    # the module under which surgery finds the router and experts when `module` is only a view the decoder
    # layer calls (Gemma 4: they are children of the decoder layer itself, whose path is empty); None: `module`
    owner = None  # nn.Module | None; a class attribute, not a dataclass field
    # a condensed block keeps the family's block, router and shared experts included, with only its experts
    # replaced by fixed-weight ones (`FixedWeightExperts`): for a shared output that depends on routing
    condense_keeps_router = False
    # the block's router and experts classes take sizes, not a config: a pruned layer takes them from
    # the family's block built (from a config) at the new expert count
    sized_by_block = False
    # names (under the block) of the modules holding the experts when they are several, in the order
    # the block runs them, each as part(rows sorted by expert, rows per expert) (an input and an
    # output projection per expert); `experts.module` is the first. Empty: the experts are one module
    expert_parts = ()
    # a bias the block adds to its output, always on like shared experts (`shared_out` includes it): a
    # condensed block that keeps its shared part keeps it as its down_proj bias
    output_bias = None
    # a dropped block keeps the family's block, router included, with only its experts giving 0: for a
    # router that hands state to the next layer's (ZAYA); the block must have no shared part
    drop_keeps_router = False
    # names (in the router's state dict) of its per-expert tensors, one row per expert then the extra
    # rows: pruning slices exactly these; None: every tensor whose first dimension is the expert count
    router_expert_tensors: tuple[str, ...] | None = None

    def bind(self, hidden_states: torch.Tensor, *args, **kwargs) -> MoEBlock:
        """This view for one call of the live block, `module(hidden_states, *args, **kwargs)`: a family
        whose routing (or what the block hands on) reads more of the call than the hidden states takes it
        here (ZAYA's router state from the previous layer). Default: routing reads the hidden states only."""
        return self

    def wrap_output(self, out: torch.Tensor):
        """`out` in the form the decoder layer expects from this block."""
        return (out, None) if self.returns_tuple else out

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def hidden_size(self) -> int:
        return self.router_weight.shape[1]

    @property
    def expert_intermediate(self) -> int:
        return self.experts.weights(0)[1].shape[0]

    @property
    def shared_intermediate(self) -> int:
        return 0 if self.shared is None else self.shared.up_proj.weight.shape[0]

    @property
    def router(self) -> nn.Module:
        """The module that owns `router_weight` (and any router buffer): what pruning rebuilds."""
        return next(
            m
            for m in self.module.modules()
            if any(p is self.router_weight for p in m.parameters(recurse=False))
        )

    # ---- routing -----------------------------------------------------------------------------
    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [N, E] in float32."""
        x = x.reshape(-1, self.hidden_size)
        bias = self.router_bias
        if self.routing.logits_in_fp32:
            return F.linear(x.float(), self.router_weight.float(), None if bias is None else bias.float())
        return F.linear(x, self.router_weight, bias).float()

    def active_logits(
        self, x: torch.Tensor, active: list[int] | None = None, logits: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(logits, original ids, correction bias) over the `active` experts only (all when None): what a
        router pruned to those rows sees; refuses fewer experts than top-k. Every `route` starts here."""
        if logits is None:
            logits = self.router_logits(x)
        bias = self.correction_bias
        ids = torch.arange(logits.shape[-1], device=logits.device)
        if active is not None:
            ids = torch.as_tensor(active, device=logits.device, dtype=torch.long)
            logits = logits.index_select(-1, ids)
            bias = None if bias is None else bias.index_select(0, ids)
        if self.routing.top_k > logits.shape[-1]:
            raise MoepressError(
                f"layer {self.layer_idx}: top_k={self.routing.top_k} but only {logits.shape[-1]} experts "
                "remain; keep more experts"
            )
        return logits, ids, bias

    def route(
        self, x: torch.Tensor, active: list[int] | None = None, logits: torch.Tensor | None = None
    ) -> RouteResult:
        """Route tokens as the family does, optionally over a subset of experts only.

        With `active`, the router behaves exactly as the family's router would with only those
        rows in its weight: softmax (or sigmoid) over the active experts' logits, top-k among them,
        the family's renormalisation rule, then the routed scaling factor. That is what a pruned
        checkpoint computes, so search can score a pruning without building it.
        """
        r = self.routing
        logits, ids, bias = self.active_logits(x, active, logits)
        n_active = logits.shape[-1]
        if r.scoring == "softmax":
            scores = logits.softmax(dim=-1, dtype=torch.float32)
        else:
            scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias.float()
        if r.n_group and r.n_group > 1:
            if n_active % r.n_group:
                raise MoepressError(
                    f"layer {self.layer_idx}: {n_active} experts cannot be split into {r.n_group} routing "
                    "groups; keep a multiple of n_group experts"
                )
            grouped = choice.view(-1, r.n_group, n_active // r.n_group)
            if r.group_score == "top2sum":
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, n_active).bool()
            fill = 0.0 if r.group_score == "max" else float("-inf")
            choice = choice.masked_fill(~score_mask, fill)
        if bias is None and not (r.n_group and r.n_group > 1 and r.group_score == "top2sum"):
            weights, local = torch.topk(choice, r.top_k, dim=-1)
        else:
            local = torch.topk(choice, r.top_k, dim=-1)[1]
            weights = scores.gather(1, local)
        if r.norm_topk:
            denominator = weights.sum(dim=-1, keepdim=True) + r.norm_eps
            weights = weights / (denominator.clamp(min=r.norm_min) if r.norm_min else denominator)
        weights = weights * r.scaling
        if r.weights_to_logits_dtype:
            weights = weights.to(self.router_weight.dtype)
        return RouteResult(logits=logits, scores=scores, weights=weights, index=ids[local])

    # ---- experts -----------------------------------------------------------------------------
    @property
    def condenses_to_dense(self) -> bool:
        """Whether a condensed form of this block is one dense gated MLP (`CondensedMLP`): every expert
        and the shared experts are plain bias-free MLPs of one gating kind. Otherwise the condensed
        block keeps the family's experts class (`CondensedExperts`)."""
        if not getattr(self.experts, "is_plain_mlp", True):
            return False
        if self.shared is None:
            return True
        projections = [getattr(self.shared, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if projections[1] is None or projections[2] is None:
            return False
        if any(p is not None and getattr(p, "bias", None) is not None for p in projections):
            return False
        return (projections[0] is None) == (self.experts.weights(0)[0] is None)

    def condensed_rows(self, e: int, weight: float) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Expert e's (gate, up, down) rows in a condensed dense MLP with its fixed weight folded in:
        w·down(h) scales down's columns (a family that weights the expert's input folds it elsewhere)."""
        gate, up, down = self.experts.weights(e)
        return gate, up, (down.float() * weight).to(down.dtype)

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self.experts.forward(x, e)

    def shared_out(self, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the shared experts including their gate, or None if the family has none."""
        if self.shared is None:
            return None
        out = self.shared(x)
        if self.shared_gate is not None:
            out = torch.sigmoid(self.shared_gate(x)) * out
        return out

    def routed_out(
        self,
        x: torch.Tensor,
        route: RouteResult,
        novices: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Σ_k weight_k · expert_k(x), where a novice expert contributes its constant vector."""
        out = torch.zeros_like(x)
        novices = novices or {}
        for e in route.index.unique().tolist():
            token_idx, slot = torch.where(route.index == e)
            w = route.weights[token_idx, slot, None]
            if e in novices:
                y = novices[e].to(x.dtype).expand(len(token_idx), -1)
            else:
                y = self.expert(x[token_idx], e)
            out.index_add_(0, token_idx, (y * w).to(out.dtype))
        return out

    def forward(
        self,
        x: torch.Tensor,
        action: BlockAction | None = None,
        novices: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The block's output for x [..., H] under a plan action (None = the original block)."""
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        kind = "keep" if action is None else action.action
        if kind == "drop":
            return torch.zeros(shape, dtype=x.dtype, device=x.device)
        if kind == "condense":
            out = torch.zeros_like(x)
            for e, w in zip(action.experts, action.weights, strict=True):
                out = out + w * self.expert(x, e)
        elif kind == "prune" and getattr(action, "router_rows", "kept") == "all":
            # every router row stays; each expert id reaches the kept expert that holds it
            route = self.route(x)
            kept = torch.as_tensor(action.keep_experts, device=route.index.device)
            slots = torch.as_tensor(action.expert_map(self.num_experts), device=route.index.device)
            route.index = kept[slots[route.index]]
            out = self.routed_out(x, route, novices)
        else:
            active = None
            if kind == "prune":
                active = sorted(set(action.keep_experts) | set(action.novices))
            out = self.routed_out(x, self.route(x, active), novices)
        shared = self.shared_out(x)
        if shared is not None and not (kind == "condense" and not action.keep_shared):
            out = out + shared
        return out.reshape(shape)


@dataclass(frozen=True)
class DensePlacement:
    """Where a family's own config can make a decoder layer dense (Qwen's `mlp_only_layers`), and the
    dense MLP the family's decoder layer then builds there: `down(act(gate x) * up x)` (no gate when
    not `gated`), no bias, `width` intermediate rows, parameters `gate_proj`, `up_proj`, `down_proj`.
    Surgery writes a condensed or dropped MoE layer as that MLP (zero-padded to `width`) where it can,
    so the output stays a plain checkpoint of the source architecture (`surgery.dense`)."""

    key: str  # config field listing the dense layers' ids
    path: str  # where the dense MLP sits under the decoder layer
    width: int  # its intermediate size
    hidden_act: str  # its activation (an ACT2FN name)
    gated: bool = True


class Adapter:
    """Family knowledge: where the MoE pieces live and how the family routes."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    num_experts_key: str = "num_experts"  # config field holding the routed expert count
    # that field also sizes other modules (mixture-of-attention experts), so pruning never changes it: a
    # pruned model keeps the count and records its experts in `moepress_structure`
    expert_count_shared: bool = False
    # state a decoder layer hands the next one: keyword argument of layer j + 1 <- index in layer j's
    # output tuple (DeepSeek sparse attention's "shared" indexer layers reuse the previous top-k);
    # layer-by-layer runs pass it on as the model's own loop does
    carried: dict[str, int] = {}
    # layer arguments the model's loop derives from earlier layers' inputs (Inkling-2's block states):
    # `hand_on` computes them; any other argument that depends on earlier layers is refused
    state_arguments: tuple[str, ...] = ()

    def hand_on(self, layer: nn.Module, kwargs: dict, hidden_in: torch.Tensor, output) -> dict:
        """The state decoder layer `layer`, called with `kwargs` on `hidden_in`, hands the next layer,
        as the model's own loop does (by default: `carried` items of its output tuple)."""
        if not self.carried or not isinstance(output, tuple):
            return {}
        return {name: output[k] for name, k in self.carried.items()}

    # Published checkpoints store one tensor per expert under these names (see calibrate/streaming.py).
    legacy_expert_names: dict[str, str] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

    def legacy_aliases(self, name: str) -> list[str]:
        """Other names a checkpoint may use for model tensor `name` (older layouts)."""
        return []

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm between the last decoder layer and the LM head (search scores hidden states with it)."""
        return model.model.norm

    def is_moe(self, layer: nn.Module) -> bool:
        return hasattr(layer.mlp, "experts")

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        raise NotImplementedError

    def dense_placement(self, config) -> DensePlacement | None:
        """Where `config` can list a decoder layer as the family's dense MLP (see `DensePlacement`);
        None (the default): it cannot, and condensed or dropped layers stay moepress modules."""
        return None

    def dense_mlp(self, config) -> nn.Module:
        """An empty dense MLP of the family at `dense_placement(config).width` rows, as the family's
        decoder layer builds it for a listed layer (in the ambient device; weights load later)."""
        raise NotImplementedError(f"{self.family} places no dense layer")

    def matches(self, model: nn.Module) -> bool:
        # a compressed checkpoint's own model_type (`moepress_deepseek_v2`) is of its source's family
        return source_model_type(getattr(model.config, "model_type", None) or "") in self.model_types

    # ---- convenience over the whole model ------------------------------------------------------
    def moe_layer_ids(self, model: nn.Module) -> list[int]:
        return [i for i, layer in enumerate(self.layers(model)) if self.is_moe(layer)]

    def unviewed_moe_layers(self, model: nn.Module) -> dict[int, str]:
        """MoE layers the expert view leaves out, each with the one-line reason: every method keeps
        them as they are, and they keep the config's routed-expert count (DeepSeek-V4's hash-routed
        layers). Empty for most families."""
        return {}

    def blocks(self, model: nn.Module) -> dict[int, MoEBlock]:
        layers = self.layers(model)
        return {i: self.block(i, layers[i]) for i in self.moe_layer_ids(model)}

    def component(self, name: str) -> str:
        """Which part of the model a parameter belongs to, for byte accounting."""
        if "embed_tokens" in name or name.startswith("lm_head"):
            return "embeddings"
        if ".self_attn." in name:
            return "attention"
        if ".mlp.shared_expert" in name:
            return "shared_experts"
        if ".mlp.experts." in name or ".mlp.novices" in name:
            return "routed_experts"
        if ".mlp.gate." in name and "gate_proj" not in name:
            return "router"
        if ".mlp." in name:
            return "dense_mlp"
        return "norms_other"


_REGISTRY: list[Adapter] = []


def register(adapter_cls: type[Adapter]) -> type[Adapter]:
    _REGISTRY.append(adapter_cls())
    return adapter_cls


def register_adapter(adapter: Adapter) -> Adapter:
    """Register an adapter instance (declared families share one adapter class)."""
    _REGISTRY.append(adapter)
    return adapter


def supported_families() -> list[str]:
    return [a.family for a in _REGISTRY]


def get_adapter(model: nn.Module, require_moe: bool = True) -> Adapter:
    """The adapter for a loaded model, auto-detected from its config and structure.

    `require_moe=False` also accepts a model whose MoE layers were all condensed or dropped (fine-tuning
    a compressed model still needs to find its layers).
    """
    for adapter in _REGISTRY:
        if adapter.matches(model):
            if require_moe and not adapter.moe_layer_ids(model):
                raise MoepressError(f"model of family {adapter.family} has no MoE layer; nothing to compress")
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    check_model_type(model_type)

    if is_transformers_moe(source_model_type(model_type)):
        reason = NO_ADAPTER_YET.get(source_model_type(model_type), "")
        raise MoepressError(
            f"model type {model_type!r} is a Mixture-of-Experts family of transformers, but moepress has no "
            f"adapter for it{': ' + reason if reason else ''}; open an issue with the model name, or use one of "
            f"the supported families (`moepress families`)"
        )
    raise MoepressError(
        f"unsupported model family {model_type!r} (not a Mixture-of-Experts family moepress knows); give a "
        f"checkpoint of one of: {', '.join(supported_families())}"
    )
