"""MiniMax-Text-01 (`minimax`), MiniMax-M2 (`minimax_m2`) and MiniMax-M3 (`minimax_m3_vl_text`).

- MiniMax-Text-01: hybrid lightning (linear) / full attention layers, every one MoE. Mixtral routing:
  logits in the activations' dtype, softmax in float32, top-k, always renormalised, the weights stay
  float32. No shared experts. Experts count in `num_local_experts`.
- MiniMax-M2: sigmoid scores, top-k chosen on `scores + e_score_correction_bias`, the chosen scores
  renormalised. The correction bias is a buffer of the MoE BLOCK (`mlp.e_score_correction_bias`), not
  of the router, so the block view picks it up there.
- MiniMax-M3 (text model of the VL release): M2's routing with the bias on the router, the block
  output multiplied by `routed_scaling_factor` (folded into the weights here), plus one ungated
  shared expert (`shared_experts`, a fused gate_up dense MLP). Experts and shared expert use a
  clamped SwiGLU (`(up + 1) * gate * sigmoid(alpha * gate)`, gpt-oss style, not interleaved): the
  experts' own `_apply_gate`, so they condense to the experts class, not to a dense MLP. Dense layers
  are those marked "dense" in `mlp_layer_types`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from moepress.models.base import MoEBlock, Routing
from moepress.models.declared import Family, declare


def mixtral_like_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=True, logits_in_fp32=False)


def sigmoid_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=True, logits_in_fp32=False)


@dataclass
class MiniMaxBlock(MoEBlock):
    """What lives on the MoE block rather than the router: M2's correction bias, M3's scaling."""

    def __post_init__(self) -> None:
        if self.correction_bias is None:
            self.correction_bias = getattr(self.module, "e_score_correction_bias", None)
        scaling = getattr(self.module, "routed_scaling_factor", None)
        if scaling is not None:
            self.routing = replace(self.routing, scaling=float(scaling))

    @property
    def shared_intermediate(self) -> int:
        fused = getattr(self.shared, "gate_up_proj", None)  # M3's shared expert fuses gate and up
        return fused.weight.shape[0] // 2 if fused is not None else super().shared_intermediate


declare(Family(
    name="minimax",
    model_types=("minimax",),
    routing=mixtral_like_routing,
    num_experts_key="num_local_experts",
    tiny=dict(layer_types=["linear_attention", "full_attention", "linear_attention"], block_size=4),
))

declare(Family(
    name="minimax_m2",
    model_types=("minimax_m2",),
    routing=sigmoid_routing,
    num_experts_key="num_local_experts",
    block_cls=MiniMaxBlock,
    tiny=dict(rotary_dim=8),
))

declare(Family(
    name="minimax_m3_vl_text",
    model_types=("minimax_m3_vl_text",),
    routing=sigmoid_routing,
    num_experts_key="num_local_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    block_cls=MiniMaxBlock,
    tiny=dict(mlp_layer_types=["dense", "sparse", "sparse"], layer_types=["full_attention"] * 3,
              intermediate_size=16, shared_intermediate_size=16, dense_intermediate_size=64, rotary_dim=8),
))
