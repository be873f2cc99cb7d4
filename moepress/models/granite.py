"""IBM Granite MoE: `granitemoe` (3.0/3.1 MoE), `granitemoe_swa` (sliding-window attention layers),
`granitemoeshared` (shared MLP) and `granitemoehybrid` (Granite-4.0: Mamba-2 and attention layers).

Quirks spelled out here:
- The MoE block is `layer.block_sparse_moe` (router `router`, experts `experts`), on every layer.
- Routing: logits in the activations' dtype, top-k on the RAW logits, softmax over the k chosen
  logits only: equal to a softmax over all experts renormalised over the top-k (`norm_topk`), so a
  pruned router (fewer logits) picks and weights exactly as `Routing(softmax, norm_topk)` says.
  Weights are cast back to the activations' dtype.
- The shared MLP (`layer.shared_mlp`, granitemoeshared/hybrid) sits on the decoder layer NEXT TO the
  MoE block, not inside it: `layer(x) = block_sparse_moe(x) + shared_mlp(x)`. The MoEBlock view is
  the routed block alone (`shared=None`); condensing/dropping the block leaves `shared_mlp` in place.
- Decoder layers scale the MLP output by `residual_multiplier`, outside the block.
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def granite_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=router.top_k,
        norm_topk=True,
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


def _hybrid_tiny(cfg) -> None:
    """Mamba, attention, Mamba; every layer MoE."""
    cfg.layer_types = ["linear_attention", "full_attention", "linear_attention"]
    cfg.shared_intermediate_size = 32
    cfg.mamba_n_heads, cfg.mamba_d_head, cfg.mamba_d_state, cfg.mamba_chunk_size = 4, 16, 16, 16


_GRANITE = dict(
    routing=granite_routing,
    num_experts_key="num_local_experts",
    mlp=("block_sparse_moe",),
    router="router",
)

declare(Family(name="granitemoe", model_types=("granitemoe",), tiny=dict(intermediate_size=16), **_GRANITE))
declare(Family(name="granitemoe_swa", model_types=("granitemoe_swa",), tiny=dict(intermediate_size=16), **_GRANITE))
declare(Family(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    tiny=dict(intermediate_size=16, shared_intermediate_size=32),
    **_GRANITE,
))
declare(Family(name="granitemoehybrid", model_types=("granitemoehybrid",), tiny=_hybrid_tiny, **_GRANITE))
