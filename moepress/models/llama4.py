"""Llama 4 (`llama4_text`, and `llama4`: Scout 17B-16E, Maverick 17B-128E) in transformers v5.

Quirks spelled out here:
- The router (`feed_forward.router`, an `nn.Linear` without bias, logits in the activations' dtype)
  picks the top-k LOGITS and gives each chosen expert the weight `sigmoid(logit)`: no softmax, no
  renormalisation, so a pruned router's weights are the kept experts' own sigmoids.
- The weight scales the expert's INPUT, not its output: `expert_e(sigmoid(l_e) * x)`. Every expert
  runs on every token (unchosen ones on a zero input, which gives 0 since experts have no bias);
  `Llama4Block.routed_out` computes only the chosen ones. A condensed layer uses fixed output
  weights (`Σ w_e expert_e(x)`), like every condensed layer.
- `Llama4TextExperts` is not a `use_experts_implementation` class: it takes pre-routed input of
  shape [E·N, H] (expert-major) and stores `gate_up_proj [E, H, 2I]` (gate columns first) and
  `down_proj [E, I, H]`, both transposed; `Llama4Experts` reads them.
- One shared expert (`feed_forward.shared_expert`, a plain gated MLP) is added to every token
  without a gate.
- MoE layers are those in `moe_layers` (Maverick interleaves dense and MoE layers); dense layers
  use `intermediate_size_mlp`. The MoE block returns `(output, router_logits)`.
- `llama4` (the multimodal checkpoint) is loaded as `Llama4ForCausalLM` of its text config by
  `AutoModelForCausalLM`; the layers are the same.
"""

from __future__ import annotations

import torch

from moepress.models.base import ExpertStore, MoEBlock, RouteResult, Routing
from moepress.models.declared import Family, declare


class Llama4Experts(ExpertStore):
    """`Llama4TextExperts`: `gate_up_proj [E, H, 2I]` (gate columns first), `down_proj [E, I, H]`."""

    def __init__(self, module):
        super().__init__(module, module.act_fn)

    @property
    def num_experts(self) -> int:
        return self.module.down_proj.shape[0]

    def weights(self, e: int):
        gate_up = self.module.gate_up_proj[e].T
        inter = gate_up.shape[0] // 2
        return gate_up[:inter], gate_up[inter:], self.module.down_proj[e].T

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = (x @ self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * self.act_fn(gate)) @ self.module.down_proj[e]


class Llama4Block(MoEBlock):
    """Top-k on the logits, sigmoid weights, weights applied to each expert's input."""

    novice_refusal = "Llama-4's experts see weight·x, never the weight, so a constant output cannot be weighted"
    mapping_refusal = "Llama-4's experts module runs every router row's expert on its own input slice"

    def route(self, x, active=None, logits=None) -> RouteResult:
        logits, ids, _ = self.active_logits(x, active, logits)
        k = self.routing.top_k
        top, local = torch.topk(logits, k, dim=-1)
        weights = top.sigmoid().to(self.router_weight.dtype)
        return RouteResult(logits=logits, scores=logits.sigmoid(), weights=weights, index=ids[local])

    def routed_out(self, x, route, novices=None):
        out = torch.zeros_like(x)
        novices = novices or {}
        for e in route.index.unique().tolist():
            token_idx, slot = torch.where(route.index == e)
            w = route.weights[token_idx, slot, None].to(x.dtype)
            if e in novices:
                y = w * novices[e].to(x.dtype)
            else:
                y = self.expert(x[token_idx] * w, e)
            out.index_add_(0, token_idx, y)
        return out


def llama4_routing(router, config) -> Routing:
    return Routing(scoring="sigmoid", top_k=router.top_k, norm_topk=False, logits_in_fp32=False)


def _tiny(cfg) -> None:
    """Layer 0 dense, layers 1 and 2 MoE; small dense MLP; tiny vision tower for `llama4`."""
    text = getattr(cfg, "text_config", cfg)
    text.intermediate_size = 16
    text.intermediate_size_mlp = 64
    text.moe_layers = [1, 2]
    vision = getattr(cfg, "vision_config", None)
    if vision is not None:
        for key, value in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               image_size=28, patch_size=14, projector_input_dim=32, projector_output_dim=32,
                               vision_output_dim=32).items():
            setattr(vision, key, value)


declare(Family(
    returns_tuple=True,
    name="llama4",
    model_types=("llama4_text", "llama4"),
    routing=llama4_routing,
    num_experts_key="num_local_experts",
    mlp=("feed_forward",),
    router="router",
    shared="shared_expert",
    block_cls=Llama4Block,
    store=Llama4Experts,
    tiny=_tiny,
))
