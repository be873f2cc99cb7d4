"""AFMoE (`afmoe`, Arcee Trinity).

- The router (`mlp.router`, `AfmoeTokenChoiceRouter`) holds its weight in a Linear, `router.gate`;
  logits are computed in the activations' dtype and cast to float32.
- Sigmoid scores; the correction bias is the BLOCK's `expert_bias` parameter (passed to the router
  at call time), added for the choice only; no groups; the chosen unbiased scores always
  renormalised (+1e-20), then times `route_scale`.
- One always-on ungated shared MLP of `num_shared_experts × moe_intermediate_size` rows.
- The first `num_dense_layers` layers are dense.
`AfmoeAdapter` reads the weight from `router.gate` and the bias from the block; `AfmoeBlock.router`
names the router module (what pruning rebuilds at the pruned size).
"""

from __future__ import annotations

from moepress.models.base import MoEBlock, Routing, TransformersExperts, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family


def afmoe_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=True, scaling=float(router.route_scale),
                   logits_in_fp32=False, norm_eps=1e-20)


class AfmoeBlock(MoEBlock):
    @property
    def router(self):
        return self.module.router


class AfmoeAdapter(DeclaredAdapter):
    def block(self, layer_idx: int, layer) -> MoEBlock:
        mlp = layer.mlp
        return AfmoeBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.router.gate.weight,
            routing=afmoe_routing(mlp.router, mlp.config),
            experts=TransformersExperts(mlp.experts),
            shared=mlp.shared_experts,
            correction_bias=mlp.expert_bias,
        )


_SPEC = Family(
    name="afmoe",
    model_types=("afmoe",),
    routing=afmoe_routing,
    router="router",
    shared="shared_experts",
    block_cls=AfmoeBlock,
    tiny=dict(num_dense_layers=1, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
)
FAMILIES[_SPEC.name] = _SPEC
register_adapter(AfmoeAdapter(_SPEC))
