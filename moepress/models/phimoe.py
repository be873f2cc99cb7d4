"""Phi-3.5-MoE (`phimoe`): Mixtral-like layout with SparseMixer routing.

Quirks spelled out here:
- The MoE block is `layer.mlp` (router `router`, an `nn.Linear` subclass; experts
  `experts`); expert count `num_local_experts`; logits in the activations' dtype.
- SparseMixer routing (eval mode) always picks TWO experts, whatever `num_experts_per_tok`:
  1st = argmax of the logits; its weight is the softmax, at that expert, over the logits left after
  masking every expert whose relative gap `(max - l) / max(|l|, max)` exceeds `2 * router_jitter_noise`;
  2nd = argmax once the 1st is masked out; its weight is the softmax at that expert over the logits
  (1st excluded) whose gap to the 2nd's logit (relative to `max(|l|, 2nd)`) is at most `2 * jitter`.
  So the weights are neither renormalised nor a plain softmax: `PhimoeBlock.route` re-implements
  it on the active experts' logits, which is what a router with only those rows computes.
- In training mode the choice is sampled (Gumbel) with Heun-style multipliers; not reproduced here.
"""

from __future__ import annotations

import torch

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult, Routing
from moepress.models.declared import Family, declare


def _sparsemixer_eval(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `sparsemixer(..., training=False)`: (weights [N, 2], local index [N, 2])."""
    threshold, first = logits.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=threshold)
    masked = logits.masked_fill((threshold - logits) / factor > 2 * jitter_eps, float("-inf"))
    w1 = masked.softmax(dim=-1).gather(-1, first)
    rest = torch.scatter(logits, -1, first, float("-inf"))
    threshold, second = rest.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=threshold)
    masked = rest.masked_fill((threshold - logits) / factor > 2 * jitter_eps, float("-inf"))
    w2 = masked.softmax(dim=-1).gather(-1, second)
    return torch.cat((w1, w2), dim=-1), torch.cat((first, second), dim=-1)


class PhimoeBlock(MoEBlock):
    def route(self, x, active=None, logits=None) -> RouteResult:
        if logits is None:
            logits = self.router_logits(x)
        ids = torch.arange(logits.shape[-1], device=logits.device)
        if active is not None:
            ids = torch.as_tensor(active, device=logits.device, dtype=torch.long)
            logits = logits.index_select(-1, ids)
        if logits.shape[-1] < 2:
            raise MoepressError(f"layer {self.layer_idx}: SparseMixer routing needs at least 2 experts")
        weights, local = _sparsemixer_eval(logits, self.router.router_jitter_noise)
        return RouteResult(
            logits=logits,
            scores=logits.softmax(dim=-1, dtype=torch.float32),
            weights=weights.to(self.router_weight.dtype),
            index=ids[local],
        )


def phimoe_routing(router, config) -> Routing:
    # top_k=2 always (SparseMixer); the rest is unused by PhimoeBlock.route
    return Routing(scoring="softmax", top_k=2, norm_topk=False, logits_in_fp32=False)


declare(Family(
    name="phimoe",
    model_types=("phimoe",),
    routing=phimoe_routing,
    num_experts_key="num_local_experts",
    router="router",
    block_cls=PhimoeBlock,
    tiny=dict(intermediate_size=16),
))
