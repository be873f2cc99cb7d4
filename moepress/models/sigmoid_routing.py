"""Shared pieces of the DeepSeek-V3 lineage declarations (no family is declared here).

Most of these families copy DeepSeek-V3's `TopkRouter`: sigmoid scores, `e_score_correction_bias`
added for the CHOICE only, group-limited choice (group score = sum of the top-2 biased scores;
experts outside the best `topk_group` groups masked to -inf), the chosen unbiased scores renormalised
(+1e-20) when `norm_topk_prob`, then times `routed_scaling_factor`. `v3_routing` reads exactly that
from the router module. `ZeroFillGroupBlock` is the variant that masks the other groups to 0.0
instead of -inf (A.X-K2). `moe_tiny` gives a tiny config one dense and two MoE layers.
"""

from __future__ import annotations

import torch

from moepress.errors import MoepressError
from moepress.models.base import MoEBlock, RouteResult, Routing


def v3_routing(router, config) -> Routing:
    """DeepSeek-V3 `TopkRouter` routing, read from the router module."""
    n_group = getattr(router, "num_group", None)
    return Routing(
        scoring="sigmoid",
        top_k=router.top_k,
        norm_topk=bool(router.norm_topk_prob),
        scaling=float(router.routed_scaling_factor),
        n_group=n_group,
        topk_group=getattr(router, "topk_group", None) if n_group else None,
        group_score="top2sum" if n_group else None,
        norm_eps=1e-20,
    )


class ZeroFillGroupBlock(MoEBlock):
    """Group-limited choice (top-2-sum group score) whose masked experts get a choice score of 0.0,
    not -inf: a masked expert can still win over an expert whose biased score is negative."""

    def route(self, x, active=None, logits=None) -> RouteResult:
        r = self.routing
        if not (r.n_group and r.n_group > 1):
            return super().route(x, active, logits)
        logits, ids, bias = self.active_logits(x, active, logits)
        n = logits.shape[-1]
        if n % r.n_group:
            raise MoepressError(
                f"layer {self.layer_idx}: {n} experts cannot be routed top-{r.top_k} in {r.n_group} groups"
            )
        scores = logits.sigmoid()
        choice = scores if bias is None else scores + bias.float()
        grouped = choice.view(-1, r.n_group, n // r.n_group)
        group_idx = torch.topk(grouped.topk(2, dim=-1)[0].sum(dim=-1), k=r.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros(grouped.shape[:2], device=choice.device).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, n).bool()
        local = torch.topk(choice.masked_fill(~score_mask, 0.0), r.top_k, dim=-1)[1]
        weights = scores.gather(1, local)
        if r.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + r.norm_eps)
        return RouteResult(logits=logits, scores=scores, weights=weights * r.scaling, index=ids[local])


def moe_tiny(**overrides):
    """A `Family.tiny` function: layer 0 dense, layers 1-2 MoE (whichever of `mlp_layer_types` /
    `first_k_dense_replace` the config uses), MLA key/value heads = query heads, then `overrides`."""

    def tiny(cfg) -> None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text, "mlp_layer_types", None) is not None:
            text.mlp_layer_types = ["dense"] + ["sparse"] * (text.num_hidden_layers - 1)
        if hasattr(text, "first_k_dense_replace"):
            text.first_k_dense_replace = 1
        if hasattr(text, "kv_lora_rank"):
            text.num_key_value_heads = text.num_attention_heads
        for key, value in overrides.items():
            setattr(text, key, value)

    return tiny
