"""Inkling text decoder (`inkling_text`): block view, tiny config and registration.

Quirks spelled out here:
- The router `gate` has `n_routed_experts + n_shared_experts` rows: the last `n_shared_experts` rows
  score the shared experts. Logits in float32; the choice is sigmoid(routed logits) plus the
  `e_score_correction_bias` ([E], routed experts only), top-k. The weights are the sigmoids of the k
  chosen routed logits AND of the shared logits, normalised together (softmax of their
  log-sigmoids), times `route_scale` and the router's learned scalar `global_scale`; the last
  `n_shared_experts` of them (`gammas`) scale the shared experts, so the shared output depends on
  routing (on which experts remain after pruning, too).
- The shared experts (`shared_experts`) are stacked `[S, I, H]` parameters, not an MLP of nn.Linear.
- Each decoder layer runs a short convolution (`mlp_sconv`) on the MLP output before the residual.
- Dense layers are the "dense" entries of `mlp_layer_types` (`dense_mlp_idx`).

Pruning keeps the router's last `n_shared_experts` rows after the kept experts' rows
(`extra_router_rows`); the shared gammas of a pruned layer are then normalised against the kept experts
chosen, exactly as `InklingBlock.route(active=...)` computes. Novices take router slots like kept experts
(their logits join the gammas' normalisation as in the pruned router). A condensed layer keeps the whole
block, router and shared experts included (`condense_keeps_router`): its routed experts become the
chosen ones at fixed weights (`FixedWeightExperts`) and the full router still gives the shared experts'
per-token gammas, so the shared output is exactly the original's (cost: the router's [E + S, H] GEMM
and its bytes). Such a layer must keep its shared experts (`keep_shared=False` is refused).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult, Routing
from moepress.models.declared import Family, declare


@dataclass
class InklingRoute(RouteResult):
    shared_weights: torch.Tensor | None = None  # [N, S] the shared experts' gammas


def inkling_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=True, scaling=float(router.route_scale))


@dataclass
class InklingBlock(MoEBlock):
    """Routing over routed + shared router rows; the shared output scaled by the routing's gammas.

    `router_logits` gives all E + S columns (so `route(x, active, logits=router_logits(x))` works);
    `RouteResult.logits` / `.scores` hold the active routed experts' columns only."""

    @property
    def extra_router_rows(self) -> int:
        return self.module.gate.n_shared_experts  # the shared experts' trailing router rows

    @property
    def shared_intermediate(self) -> int:
        gate = self.shared.up_proj
        return gate.shape[0] * gate.shape[1]

    condense_keeps_router = True  # the shared experts' gammas depend on routing: the router stays

    @property
    def condenses_to_dense(self) -> bool:
        return False  # the shared experts' gammas depend on routing: no fixed dense MLP reproduces them

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if e >= self.num_experts:  # the router's trailing rows are the shared experts, never routed to
            raise MoepressError(f"layer {self.layer_idx}: id {e} is a shared expert's router row, not a routed expert")
        return super().expert(x, e)

    def route(self, x, active=None, logits=None) -> InklingRoute:
        r, n_experts = self.routing, self.num_experts
        if logits is None:
            logits = self.router_logits(x)
        if logits.shape[-1] != n_experts + self.extra_router_rows:
            raise MoepressError(f"layer {self.layer_idx}: Inkling routing needs the shared experts' logits too")
        routed, shared = logits[..., :n_experts], logits[..., n_experts:]
        ids = torch.arange(n_experts, device=logits.device)
        bias = self.correction_bias
        if active is not None:
            ids = torch.as_tensor(active, device=logits.device, dtype=torch.long)
            routed = routed.index_select(-1, ids)
            bias = bias.index_select(0, ids)
        if r.top_k > routed.shape[-1]:
            raise MoepressError(f"layer {self.layer_idx}: top_k={r.top_k} but only {routed.shape[-1]} experts remain")
        scores = routed.sigmoid()
        local = torch.topk(scores + bias.float(), r.top_k, dim=-1, sorted=False)[1]
        log_probs = F.logsigmoid(torch.cat([routed.gather(-1, local), shared], dim=-1))
        weights = torch.exp(log_probs - torch.logsumexp(log_probs, dim=-1, keepdim=True))
        weights = (weights * r.scaling * self.router.global_scale.float()).to(self.experts.module.down_proj.dtype)
        return InklingRoute(logits=routed, scores=scores, weights=weights[..., : r.top_k].contiguous(),
                            index=ids[local], shared_weights=weights[..., r.top_k :].contiguous())

    def shared_out(self, x: torch.Tensor, route: InklingRoute | None = None) -> torch.Tensor:
        """The shared experts scaled by the gammas of `route` (the full routing when not given)."""
        flat = x.reshape(-1, self.hidden_size)
        route = route if route is not None else self.route(flat)
        return self.shared(flat, gammas=route.shared_weights).view(x.shape)

    def forward(self, x, action=None, novices=None):
        kind = "keep" if action is None else action.action
        if kind not in ("keep", "prune"):
            return super().forward(x, action, novices)
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        active = None if kind == "keep" else sorted(set(action.keep_experts) | set(action.novices))
        route = self.route(x, active)
        return (self.routed_out(x, route, novices) + self.shared_out(x, route)).reshape(shape)


def _tiny(cfg) -> None:
    for key, value in dict(layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"], unpadded_vocab_size=128,
                           mlp_layer_types=["dense", "sparse", "sparse"], swa_num_attention_heads=4,
                           swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4, n_shared_experts=2,
                           route_scale=2.0).items():
        setattr(cfg, key, value)


SPEC = declare(Family(
    name="inkling_text",
    model_types=("inkling_text",),
    routing=inkling_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=InklingBlock,
    tiny=_tiny,
))
