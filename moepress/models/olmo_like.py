"""FlexOlmo (`flex_olmo`) and Mellum (`mellum`): plain softmax top-k MoE blocks, no shared experts.

Routing as Qwen3-MoE / OLMoE: logits in the activations' dtype, softmax in float32, top-k,
renormalised when `norm_topk_prob`, the weights cast back to the logits' dtype.
- FlexOlmo: every layer MoE; the config counts experts in `num_experts` (`num_local_experts` is an
  alias of it, which its experts class reads). Post-norm decoder layers (norms after attention and
  MLP), which do not touch the block.
- Mellum: dense layers are those marked "dense" in `mlp_layer_types`.
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def softmax_topk_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=router.top_k,
        norm_topk=bool(router.norm_topk_prob),
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


declare(Family(name="flex_olmo", model_types=("flex_olmo",), routing=softmax_topk_routing))

declare(Family(
    name="mellum",
    model_types=("mellum",),
    routing=softmax_topk_routing,
    tiny=dict(mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=4,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
))
