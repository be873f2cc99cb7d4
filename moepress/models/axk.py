"""A.X K2 (`axk2`), SK Telecom's DeepSeek-V3 derivative. (A.X K1 applies a post-MLP norm inside
its MoE block, which a condensed block would lose: no adapter yet, see models/families.py.)

- `axk2`: DeepSeek-V3 routing, except that experts outside the best groups get a choice score of
  0.0 instead of -inf (`ZeroFillGroupBlock`), and "light" checkpoints (`n_group=None`) skip the
  group step. Input/post-attention norms are gated RMSNorms outside the MoE block.
Dense/MoE per layer from `mlp_layer_types`.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import ZeroFillGroupBlock, moe_tiny, v3_routing

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
