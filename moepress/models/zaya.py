"""ZAYA (`zaya`, Zyphra ZAYA1): block view, tiny config and registration.

Quirks spelled out here:
- The router (`mlp.gate`, `ZayaRouter(config, layer_idx)`) is an MLP: `down_proj` (H -> R, with bias,
  R = `router_hidden_size`), then, in every layer but the first, plus the router state carried from the
  previous layer times `router_states_scale` ("EDA"); that sum is the state handed to the next layer;
  then `router_mlp` (RMSNorm, two GELU layers, `out_proj` R -> E + 1 without bias) gives the logits,
  in the model's dtype. The block is called `mlp(hidden, prev_router_hidden_states)` and returns
  `(output, state)`; the decoder layer returns `(hidden, state)` and the model's loop passes it on
  (positionally) to the next layer.
- E + 1 router classes: the last is a "skip" expert without weights. Softmax over all E + 1 logits (in
  the logits' dtype); the choice adds the `balancing_biases` buffer ([E + 1], float32) to the scores;
  the weights are the chosen unbiased scores, not renormalised; top-1 (the config refuses any other
  top-k). A token routed to the skip expert gets nothing (weight 0).
- transformers' `_init_weights` sets the skip expert's balancing bias to -1 on every load (even from a
  checkpoint that stores another value), so the view's `correction_bias` is the real experts' part
  ([:E], a view of the buffer); routing reads the whole buffer.
- The decoder layer scales the MLP output and the residual with learned per-channel scales and biases
  (`post_mlp_residual_scale`), so a trained layer is not of the residual form h_mid + mlp(x) (the
  CD-MoE search then runs it whole).

So: the view's `hidden_size` is H (`router_weight` is `out_proj`'s [E + 1, R]); the skip expert is the
router's one extra row (`extra_router_rows`), always active, named E in routes, with output 0, and a
pruned router keeps it last (with its balancing bias) as `ZayaRouter` expects. The router's per-expert
tensors are named (`router_expert_tensors`), so pruning slices exactly those whatever R is. Routing
reads the carried state: `bind` gives the view of one call of the block (the state it got, the hidden
states it hands on from), and every layer-by-layer run routes through it (calibration, search, REAM).
A condensed layer keeps the block and its router (`condense_keeps_router`: `FixedWeightExperts`), and
a dropped one keeps them too with experts giving 0 (`drop_keeps_router`), so the state still reaches the
next layer as in the original. Novices work (they take router slots before the skip row).
Sampled MoE inputs (NAEE, merging features) are single token states without their carried state: their
router logits there are those of the state-free router, an approximation of those features only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult, Routing, TransformersExperts, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family


def zaya_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=False, logits_in_fp32=False)


@dataclass
class ZayaBlock(MoEBlock):
    """Routing through the router MLP with the carried state of the call the view is bound to."""

    state: torch.Tensor | None = None  # router state the bound call got from the previous layer ([..., R])
    call_input: torch.Tensor | None = None  # hidden states of the bound call (the handed-on state's source)

    extra_router_rows = 1  # the skip expert's trailing router row
    condense_keeps_router = True  # the router hands state to the next layer: it stays
    drop_keeps_router = True
    router_expert_tensors = ("router_mlp.out_proj.weight", "balancing_biases")

    @property
    def router(self):
        return self.module.gate

    @property
    def hidden_size(self) -> int:
        return self.module.gate.hidden_size

    @property
    def condenses_to_dense(self) -> bool:
        return False  # the block stays (`condense_keeps_router`)

    def bind(self, hidden_states: torch.Tensor, *args, **kwargs) -> ZayaBlock:
        state = args[0] if args else kwargs.get("prev_router_hidden_states")
        return dataclasses.replace(self, state=state, call_input=hidden_states)

    def router_state(self, x: torch.Tensor) -> torch.Tensor:
        """The router MLP's input for tokens x [..., H]: down_proj(x) plus the carried state (scaled) in
        every layer but the first; also the state handed to the next layer."""
        gate = self.module.gate
        h = gate.down_proj(x)
        if gate.use_eda and self.state is not None:
            if self.state.numel() != h.numel():
                raise MoepressError(f"layer {self.layer_idx}: the router state of this call covers "
                                    f"{self.state.numel() // h.shape[-1]} tokens, not {h.numel() // h.shape[-1]}")
            h = h + self.state.reshape(h.shape) * gate.router_states_scale
        return h

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, E + 1] float32 logits (computed in the model's dtype, as the family does)."""
        x = x.reshape(-1, self.hidden_size)
        return self.module.gate.router_mlp(self.router_state(x)).float()

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if e >= self.num_experts:  # the skip expert: no computation
            return torch.zeros_like(x)
        return super().expert(x, e)

    def route(self, x, active=None, logits=None) -> RouteResult:
        n = self.num_experts
        if logits is None:
            logits = self.router_logits(x)
        bias = self.module.gate.balancing_biases  # [E + 1]: `correction_bias` is its real experts' part
        ids = torch.arange(logits.shape[-1], device=logits.device)
        if active is not None:  # the skip expert stays in every pruned router, last
            ids = torch.as_tensor(sorted(set(active) | {n}), device=logits.device, dtype=torch.long)
            logits, bias = logits.index_select(-1, ids), bias.index_select(0, ids)
        scores = torch.softmax(logits.to(self.router_weight.dtype), dim=-1)  # in the logits' dtype
        local = torch.topk(scores.float() + bias.float(), self.routing.top_k, dim=-1)[1]
        index = ids[local]
        weights = scores.gather(1, local).masked_fill(index == n, 0)  # the skip expert contributes nothing
        return RouteResult(logits=logits, scores=scores.float(), weights=weights, index=index)

    def wrap_output(self, out: torch.Tensor):
        """(output, the router state handed to the next layer) of the bound call."""
        if self.call_input is None:
            raise MoepressError(f"layer {self.layer_idx}: a ZAYA block's output carries its router state; "
                                "bind the view to the block's call first (MoEBlock.bind)")
        return out, self.router_state(self.call_input).clone()


class ZayaAdapter(DeclaredAdapter):
    """The router's logits come from `gate.router_mlp.out_proj`; the gate itself has no weight."""

    def block(self, layer_idx, layer):
        mlp = layer.mlp
        return ZayaBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.gate.router_mlp.out_proj.weight,
            routing=zaya_routing(mlp.gate, None),
            experts=TransformersExperts(mlp.experts),
            # the real experts' part of the choice bias: transformers sets the skip expert's to -1 on every load
            correction_bias=mlp.gate.balancing_biases[: mlp.experts.num_experts],
        )


# router_hidden_size 12: neither E, E + 1 nor H, so no tensor's shape could pass for another's
_TINY = dict(num_experts_per_tok=1, router_hidden_size=12, sliding_window=4,
             layer_types=["hybrid", "hybrid_sliding", "hybrid"])

SPEC = Family(
    name="zaya",
    model_types=("zaya",),
    routing=zaya_routing,
    carried={"prev_router_hidden_states": 1},
    tiny=_TINY,
)
FAMILIES[SPEC.name] = SPEC
register_adapter(ZayaAdapter(SPEC))
