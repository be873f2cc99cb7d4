"""Qwen2-MoE (`qwen2_moe`: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) and Qwen3-MoE (`qwen3_moe`).

Quirks spelled out here:
- Router logits are computed in the activations' dtype, softmax in float32, top-k, optional
  renormalisation (`norm_topk_prob`: False for Qwen1.5/2-MoE, True for Qwen3-MoE), and the
  weights are cast back to the activations' dtype.
- Qwen2-MoE has ONE shared expert of `shared_expert_intermediate_size` rows whose output is scaled
  per token by `sigmoid(shared_expert_gate(x))`; this gate depends on x and is kept as is by every
  surgery (never folded into weights). Qwen3-MoE has no shared expert.
- Dense layers are those in `mlp_only_layers` or off the `decoder_sparse_step` grid. A condensed or
  dropped layer is written as the family's own dense MLP (`Qwen2MoeMLP`/`Qwen3MoeMLP` of
  `intermediate_size` rows) listed in `mlp_only_layers`, where surgery can (`surgery.dense`): the
  output then stays a plain qwen2_moe/qwen3_moe checkpoint.
"""

from __future__ import annotations

import importlib

from torch import nn

from moepress.models.base import Adapter, DensePlacement, FusedExperts, MoEBlock, Routing, register


def _qwen_routing(gate: nn.Module) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=gate.top_k,
        norm_topk=bool(gate.norm_topk_prob),
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


class _QwenDenseLayers:
    """Both families' decoder layers build `<Family>MLP(config, intermediate_size=config.intermediate_size)`
    for a layer in `mlp_only_layers` (transformers and vLLM alike)."""

    dense_class: tuple[str, str] = ("", "")  # (module, class) of the family's dense MLP

    def dense_placement(self, config) -> DensePlacement | None:
        text = config.get_text_config()
        if not hasattr(text, "mlp_only_layers") or getattr(text, "intermediate_size", None) is None:
            return None
        return DensePlacement(
            key="mlp_only_layers", path="mlp", width=text.intermediate_size, hidden_act=text.hidden_act
        )

    def dense_mlp(self, config) -> nn.Module:
        text = config.get_text_config()
        module, name = self.dense_class
        return getattr(importlib.import_module(module), name)(text, intermediate_size=text.intermediate_size)


@register
class Qwen2MoeAdapter(_QwenDenseLayers, Adapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    num_experts_key = "num_experts"
    dense_class = ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeMLP")

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.gate.weight,
            routing=_qwen_routing(mlp.gate),
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
            shared=mlp.shared_expert,
            shared_gate=mlp.shared_expert_gate,
        )


@register
class Qwen3MoeAdapter(_QwenDenseLayers, Adapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    num_experts_key = "num_experts"
    dense_class = ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeMLP")

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.gate.weight,
            routing=_qwen_routing(mlp.gate),
            experts=FusedExperts(mlp.experts, mlp.experts.act_fn),
        )
