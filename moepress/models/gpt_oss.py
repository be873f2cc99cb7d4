"""gpt-oss (`gpt_oss`: gpt-oss-20b, gpt-oss-120b) in transformers v5.

Quirks spelled out here:
- The router is a linear layer WITH a bias (`mlp.router.bias`, one value per expert): logits are
  `x W^T + b`, computed in the activations' dtype. Routing is top-k on the logits, then a softmax
  over the k chosen logits: the same as a softmax over all experts, top-k and renormalisation,
  which is how it is declared (a pruned router takes the softmax over the kept rows only, and the
  top-k renormalisation makes that irrelevant).
- The experts (`GptOssExperts`, `use_experts_implementation(is_concatenated=False,
  is_transposed=True, has_bias=True)`) store `gate_up_proj [E, H, 2I]` with gate and up COLUMNS
  interleaved, `down_proj [E, I, H]`, and biases on both; the activation is gpt-oss's clamped
  SwiGLU `(clamp(up) + 1) * g * sigmoid(alpha g)`, g = clamp(gate) (the class's `_apply_gate`).
  `TransformersExperts` reads these flags and runs the family's own module per expert, so expert
  outputs are exact; condensing such experts into one plain gated MLP is not exact (biases,
  custom gate) and is handled, or refused, by the generic condense code.
- Every layer is MoE; there are no shared experts.
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def gpt_oss_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=router.top_k,
        norm_topk=True,
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


declare(Family(
    returns_tuple=True,
    name="gpt_oss",
    model_types=("gpt_oss",),
    routing=gpt_oss_routing,
    num_experts_key="num_local_experts",
    router="router",
    router_bias="bias",
))
