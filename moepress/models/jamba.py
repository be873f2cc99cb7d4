"""Jamba (`jamba`): hybrid Mamba/attention decoder, MoE on every `expert_layer_period`-th layer.

Quirks spelled out here:
- The MLP is `layer.feed_forward`: a `JambaSparseMoeBlock` (router `router`, experts `experts`) on
  layers with `i % expert_layer_period == expert_layer_offset`, a dense `JambaMLP` elsewhere.
- Routing: softmax over the logits (in float32), top-k, NOT renormalised, weights cast back to the
  activations' dtype. Expert count `num_experts` (`num_local_experts` is an alias).
- `config.layer_types` / `layers_block_type` are read-only, derived from
  `attn_layer_period`/`attn_layer_offset` (and `layers_num_experts` from the expert period/offset).
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def jamba_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=router.top_k,
        norm_topk=False,
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


declare(Family(
    name="jamba",
    model_types=("jamba",),
    routing=jamba_routing,
    mlp=("feed_forward",),
    router="router",
    norm="model.final_layernorm",
    # Mamba, attention, Mamba; MoE on layers 0 and 2, dense MLP on layer 1
    tiny=dict(
        intermediate_size=16, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=0, mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False,
    ),
))
