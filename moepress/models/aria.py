"""Aria's text decoder (`aria_text`): every layer an MoE block with shared experts.

Quirks spelled out here:
- Expert count `moe_num_experts`, top-k `moe_topk`.
- Routing: logits in the activations' dtype, top-k on the RAW logits, softmax over the k chosen
  logits only (= softmax over all, renormalised over the top-k).
- Experts are stored TRANSPOSED (`is_transposed=True`: `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`);
  expert intermediate size is `intermediate_size`.
- Shared experts: one MLP of `moe_num_shared_experts × intermediate_size` rows, always on, no gate.
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def aria_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=True, logits_in_fp32=False)


declare(Family(
    name="aria_text",
    model_types=("aria_text",),
    routing=aria_routing,
    num_experts_key="moe_num_experts",
    router="router",
    shared="shared_experts",
    since="5.18",  # AriaTextTopKRouter; before it the experts module routed the logits itself
    tiny=dict(moe_num_experts=8, intermediate_size=16),
))
