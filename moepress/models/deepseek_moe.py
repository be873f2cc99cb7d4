"""Remote-code DeepSeekMoE-16B style models: `mlp.gate` (a MoEGate), `mlp.experts` (a ModuleList of
MLPs with gate/up/down_proj) and `mlp.shared_experts`.

Detected by structure rather than `model_type`, because such checkpoints ship their own modeling
file and their `model_type` (`deepseek`) is unknown to transformers. Routing: softmax over all
experts, top-k, renormalised only when `norm_topk_prob` is set (False for DeepSeekMoE-16B).
"""

from __future__ import annotations

from torch import nn

from moepress.models.base import Adapter, ListExperts, MoEBlock, Routing, register


@register
class DeepseekMoeAdapter(Adapter):
    family = "deepseek_moe (remote code)"
    model_types = ("deepseek",)
    num_experts_key = "n_routed_experts"

    def is_moe(self, layer: nn.Module) -> bool:
        return isinstance(getattr(getattr(layer, "mlp", None), "experts", None), nn.ModuleList)

    def matches(self, model: nn.Module) -> bool:
        layers = getattr(getattr(model, "model", None), "layers", None)
        return layers is not None and any(self.is_moe(layer) for layer in layers)

    def block(self, layer_idx: int, layer: nn.Module) -> MoEBlock:
        mlp = layer.mlp
        gate = mlp.gate
        routing = Routing(
            scoring="softmax",
            top_k=gate.top_k,
            norm_topk=bool(gate.norm_topk_prob),
            scaling=float(getattr(gate, "routed_scaling_factor", 1.0)),
        )
        return MoEBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=gate.weight,
            routing=routing,
            experts=ListExperts(mlp.experts, mlp.experts[0].act_fn),
            shared=getattr(mlp, "shared_experts", None),
        )
