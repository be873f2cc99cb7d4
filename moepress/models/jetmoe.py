"""JetMoE (`jetmoe`: jetmoe-8b) in transformers v5.

Quirks spelled out here:
- The MoE MLP is `layer.mlp` (`JetMoeMoE`), on every layer. Its router `mlp.router`
  (`JetMoeTopKGating`) owns an `nn.Linear` without bias (`router.layer`): logits in the activations'
  dtype, cast to float32, top-k on the RAW logits, softmax over the k chosen logits only (equal to a
  softmax over all experts renormalised over the top-k), weights cast back to the activations' dtype.
  `JetMoeBlock.route` computes it the family's way, on the active experts' logits.
- The experts are TWO modules of the block, run one after the other on rows sorted by expert with
  per-expert row counts (`part(rows, expert_size)`): `mlp.input_linear` (`JetMoeParallelExperts`,
  weight [E, 2I, H], gate rows first: act(first half) * second half, act = `activation_function`)
  and `mlp.output_linear` (weight [E, H, I]). `JetMoeExperts` views both (`expert_parts`).
- The block adds its own bias `mlp.bias` [H] to every token's output, whatever the routing: the view
  treats it as the always-on part of the block (`shared_out`, `output_bias`), so a condensed block
  keeps it as its dense MLP's down_proj bias (with its shared part: `keep_shared`, true in every
  method), and a dropped block loses it with the rest of the MLP.
- The router and parallel-experts classes are built from sizes, not from a config; the block is built
  from the config (`sized_by_block`): a pruned layer's router and experts come from the block built at
  the new expert count. With novices, each experts module becomes a `SplitNoviceExperts` around the
  kept experts (novice rows skip the GEMMs; the output module gives their vectors).
- `num_local_experts` also sizes the mixture-of-attention experts (`self_attention.experts`, not
  compressed) and `num_experts_per_tok` their top-k (and the head count): a pruned checkpoint keeps
  both (`expert_count_shared`) and records its experts in `moepress_structure`, so even a uniformly
  pruned JetMoE loads through `moepress.load` (or `trust_remote_code`), never as a plain `jetmoe`.
- Attention lives in `layer.self_attention` (counted as attention), not `self_attn`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moepress.models.base import ExpertStore, MoEBlock, RouteResult, Routing, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family


class JetMoeExperts(ExpertStore):
    """`input_linear.weight [E, 2I, H]` (gate rows, then up rows) and `output_linear.weight [E, H, I]`."""

    def __init__(self, mlp):
        super().__init__(mlp.input_linear, mlp.activation)
        self.output = mlp.output_linear

    @property
    def num_experts(self) -> int:
        return self.module.weight.shape[0]

    def weights(self, e: int):
        gate_up = self.module.weight[e]
        inter = gate_up.shape[0] // 2
        return gate_up[:inter], gate_up[inter:], self.output.weight[e]

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        # the family's op order: one GEMM for gate and up, chunked
        gate, up = F.linear(x, self.module.weight[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.output.weight[e])

    def grouped_forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # the family's own parallel experts take rows sorted by expert and the per-expert counts
        sizes = counts.tolist()
        gate, up = self.module(x, sizes).chunk(2, dim=-1)
        return self.output(self.act_fn(gate) * up, sizes)


class JetMoeBlock(MoEBlock):
    """Top-k on the raw logits, softmax over the chosen ones; output bias always added."""

    sized_by_block = True
    expert_parts = ("input_linear", "output_linear")

    @property
    def router(self):
        return self.module.router  # `JetMoeTopKGating`: owns `layer.weight`

    @property
    def output_bias(self) -> torch.Tensor:
        return self.module.bias

    def shared_out(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output bias, on every token."""
        return self.module.bias.to(x.dtype).expand(x.shape)

    def route(self, x, active=None, logits=None) -> RouteResult:
        logits, ids, _ = self.active_logits(x, active, logits)
        top, local = logits.topk(self.routing.top_k, dim=-1)
        weights = torch.softmax(top, dim=-1).to(self.router_weight.dtype)
        return RouteResult(
            logits=logits, scores=logits.softmax(dim=-1, dtype=torch.float32), weights=weights, index=ids[local]
        )


def jetmoe_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax", top_k=router.top_k, norm_topk=True, logits_in_fp32=False, weights_to_logits_dtype=True
    )


class JetMoeAdapter(DeclaredAdapter):
    """The router weight is `mlp.router.layer.weight`; the experts span `input_linear` and `output_linear`."""

    expert_count_shared = True  # `num_local_experts` also sizes the attention experts

    def block(self, layer_idx, layer) -> MoEBlock:
        mlp = layer.mlp
        return JetMoeBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.router.layer.weight,
            routing=jetmoe_routing(mlp.router, None),
            experts=JetMoeExperts(mlp),
        )

    def component(self, name: str) -> str:
        if ".self_attention." in name:  # the mixture-of-attention experts are attention
            return "attention"
        if ".mlp.output_linear." in name:
            return "routed_experts"
        return super().component(name)


_SPEC = Family(
    name="jetmoe",
    model_types=("jetmoe",),
    routing=jetmoe_routing,  # JetMoeAdapter.block uses it
    num_experts_key="num_local_experts",
    router="router",
    experts="input_linear",
    tiny=dict(intermediate_size=16, kv_channels=8),
)
FAMILIES[_SPEC.name] = _SPEC
register_adapter(JetMoeAdapter(_SPEC))
