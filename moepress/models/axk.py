"""A.X K1 (`axk1`) and A.X K2 (`axk2`), SK Telecom's DeepSeek-V3 derivatives.

- `axk1`: DeepSeek-V3 routing (sigmoid, correction bias, top-2-sum group choice, -inf masking), but
  its MoE block ends with its own `post_mlp_layernorm` (an RMSNorm) on routed + shared output
  (`PostNormBlock`): a condensed block keeps that norm on its output (surgery reuses the layer's
  norm, found through `block.post_norm`), a dropped block outputs 0 (= the RMSNorm of 0). Released
  checkpoints store the norm beside the block; transformers' weight renaming moves it in.
- `axk2`: DeepSeek-V3 routing, except that experts outside the best groups get a choice score of
  0.0 instead of -inf (`ZeroFillGroupBlock`), and "light" checkpoints (`n_group=None`) skip the
  group step. Input/post-attention norms are gated RMSNorms outside the MoE block.
Dense/MoE per layer from `mlp_layer_types`.
"""

from __future__ import annotations

from moepress.models.base import MoEBlock
from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import ZeroFillGroupBlock, moe_tiny, v3_routing


class PostNormBlock(MoEBlock):
    """A block that returns norm(routed + shared); `post_norm` is that norm (a dropped block gives 0)."""

    @property
    def post_norm(self):
        return self.module.post_mlp_layernorm

    def forward(self, x, action=None, novices=None):
        out = super().forward(x, action, novices)
        return out if action is not None and action.action == "drop" else self.post_norm(out)


declare(Family(
    name="axk1",
    model_types=("axk1",),
    routing=v3_routing,
    num_experts_key="num_local_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=PostNormBlock,
    tiny=moe_tiny(),
))

declare(Family(
    name="axk2",
    model_types=("axk2",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=ZeroFillGroupBlock,
    tiny=moe_tiny(index_topk=4, index_head_dim=8, index_n_heads=2),
))
