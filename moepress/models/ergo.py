"""Ergo (`ergo`).

- The router (`mlp.gate`, `ErgoTopkRouter`) holds its weight in a Linear one level down, `gate.linear`
  (float32, `ErgoLinearWithFP32Output`: the weight rounded to the activations' dtype, accumulated in
  float32), and its `e_score_correction_bias` itself: `ErgoBlock.router` is the gate module, so pruning
  rebuilds the gate and slices both.
- Sigmoid scores, the correction bias added for the choice only, no groups; the chosen unbiased scores
  ALWAYS renormalised (+1e-20), times `moe_routed_scaling_factor`, rounded to the activations' dtype.
- The routed experts are non-gated ReLU² MLPs (`up_proj [E, H, I]`, `down_proj [E, I, H]`, transposed)
  each followed by its OWN RMSNorm (`experts.post_expert_norm.weight [E, H]`) before the weighted sum:
  `TransformersExperts` calls the module itself, so each expert's output includes its norm, and a
  condensed layer keeps the experts class (`ErgoExpertStore.is_plain_mlp` is False; the decorator's
  `has_post_expert_norm` flag does not say so, the norm being added by a subclass).
- One always-on shared expert (`shared_experts`, ReLU² MLP followed by an RMSNorm), added in full.
- Dense layers from `mlp_layer_types` (`num_dense_blocks` leading ones); residual gates and the pre/post
  feed-forward norms are in the decoder layer, outside the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moepress.models.base import MoEBlock, RouteResult, Routing, TransformersExperts, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family
from moepress.models.sigmoid_routing import moe_tiny
from moepress.models.transformers_moe import NEEDS_NEWER_TRANSFORMERS


def ergo_routing(router, config) -> Routing:
    return Routing(
        scoring="sigmoid",
        top_k=router.top_k,
        norm_topk=True,
        scaling=float(router.routed_scaling_factor),
        norm_eps=1e-20,
    )


class ErgoExpertStore(TransformersExperts):
    hidden_side_tensors = ("post_expert_norm.weight",)  # [E, H]: merges average it, aligned or not

    @property
    def is_plain_mlp(self) -> bool:
        return False  # every expert's output goes through its own RMSNorm


class ErgoBlock(MoEBlock):
    @property
    def router(self) -> nn.Module:
        return self.module.gate

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        # ErgoLinearWithFP32Output: the weight in the activations' dtype, the product in float32
        x = x.reshape(-1, self.hidden_size)
        return F.linear(x.float(), self.router_weight.to(x.dtype).float())

    def route(self, x, active=None, logits=None) -> RouteResult:
        route = super().route(x, active, logits)
        route.weights = route.weights.to(x.dtype).float()  # the router rounds its weights to the input dtype
        return route


class ErgoAdapter(DeclaredAdapter):
    """The router weight is `mlp.gate.linear.weight`, one level below the router module."""

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = self._mlp(layer)
        gate = mlp.gate
        return ErgoBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=gate.linear.weight,
            routing=ergo_routing(gate, mlp.config),
            experts=ErgoExpertStore(mlp.experts),
            shared=mlp.shared_experts,
            correction_bias=gate.e_score_correction_bias,
        )


ERGO = Family(
    name="ergo",
    since="5.25",
    model_types=("ergo",),
    routing=ergo_routing,
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=ErgoBlock,
    store=ErgoExpertStore,
    tiny=moe_tiny(
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4,
        first_dense_intermediate_size=64,
        shared_intermediate_size=32,
    ),
)


def _register() -> None:
    """`declare` for a family with its own adapter class: on a transformers older than `since`, record the
    release to install instead of registering."""
    import re

    import transformers

    def release(version: str) -> tuple[int, int]:
        major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
        return int(major), int(minor)

    if release(transformers.__version__) < release(ERGO.since):
        for model_type in ERGO.model_types:
            NEEDS_NEWER_TRANSFORMERS[model_type] = ERGO.since
        return
    FAMILIES[ERGO.name] = ERGO
    register_adapter(ErgoAdapter(ERGO))


_register()
