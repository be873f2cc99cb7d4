"""Tencent Hunyuan MoE: `hunyuan_v1_moe` (Hunyuan-A13B) and `hy_v3`.

Quirks spelled out here:
- hunyuan_v1_moe: the router `mlp.gate` is a `HunYuanMoEV1Gate` whose weight lives one level down,
  in the `nn.Linear` `gate.wg` (float32): `HunyuanGateBlock.router` is the gate module, so pruning
  rebuilds the gate (from the config) and slices `wg.weight`. Logits in float32 when `wg` is float32
  (else in the activations' dtype), softmax over all experts, top-k, ALWAYS renormalised. Expert
  count `num_experts` (`num_local_experts` an alias; a per-layer list is also allowed by the config),
  top-k `moe_topk`. One always-on shared MLP `shared_mlp` (`intermediate_size` rows), no gate.
- hy_v3: DeepSeek-V3-like sigmoid routing (float32), `e_score_correction_bias` added for the choice
  only, weights = unbiased scores renormalised (+1e-20), times `router_scaling_factor`; shared MLP
  `shared_experts` (`num_shared_experts × moe_intermediate_size` rows); `mlp_layer_types` marks
  dense/sparse layers. The correction bias is a buffer of the MoE BLOCK (`mlp.e_score_correction_bias`),
  not of the router: `HYV3Block` reads it from there. NOT declared yet: surgery slices only the
  router's and the experts' per-expert tensors, so a pruned hy_v3 would keep an E-sized block bias
  (see HY_V3 below).
"""

from __future__ import annotations

import dataclasses

import torch

from moepress.models.base import MoEBlock, Routing, TransformersExperts
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family, attr, declare, register_adapter


class HunyuanGateBlock(MoEBlock):
    @property
    def router(self):
        return self.module.gate


class HunyuanAdapter(DeclaredAdapter):
    """The router weight is `mlp.gate.wg.weight`, one level below the router module."""

    def block(self, layer_idx, layer) -> MoEBlock:
        mlp = self._mlp(layer)
        gate = mlp.gate
        return HunyuanGateBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=gate.wg.weight,
            routing=self.spec.routing(gate, attr(mlp, "config")),
            experts=TransformersExperts(mlp.experts),
            shared=mlp.shared_mlp,
        )


def hunyuan_routing(gate, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=gate.top_k,
        norm_topk=True,
        logits_in_fp32=gate.wg.weight.dtype == torch.float32,
        weights_to_logits_dtype=True,
    )


HUNYUAN_V1_MOE = Family(
    name="hunyuan_v1_moe",
    model_types=("hunyuan_v1_moe",),
    routing=hunyuan_routing,
    shared="shared_mlp",
    tiny=dict(intermediate_size=16),
)
FAMILIES[HUNYUAN_V1_MOE.name] = HUNYUAN_V1_MOE
register_adapter(HunyuanAdapter(HUNYUAN_V1_MOE))


@dataclasses.dataclass
class HYV3Block(MoEBlock):
    def __post_init__(self):
        self.correction_bias = self.module.e_score_correction_bias


def hy_v3_routing(router, config) -> Routing:
    return Routing(
        scoring="sigmoid",
        top_k=router.top_k,
        norm_topk=True,
        scaling=float(router.router_scaling_factor),
        norm_eps=1e-20,
    )


HY_V3 = Family(
    name="hy_v3",
    model_types=("hy_v3",),
    routing=hy_v3_routing,
    shared="shared_experts",
    block_cls=HYV3Block,
    tiny=dict(mlp_layer_types=["dense", "sparse", "sparse"]),
)
declare(HY_V3)
