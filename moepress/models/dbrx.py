"""DBRX (`dbrx`: dbrx-base, dbrx-instruct) in transformers v5.

Quirks spelled out here:
- The MoE block is `layer.ffn` (`DbrxFFN`); the router is `ffn.router.layer` (an `nn.Linear`
  without bias inside `DbrxRouter`, logits in the activations' dtype). Softmax over all experts,
  top-k, then the k weights are divided by their p-norm, p = `moe_normalize_expert_weights` (1 in
  the released models: renormalisation to sum 1; None: no renormalisation). `DbrxBlock.route`
  applies the same p-norm to a pruned router's weights.
- The experts (`DbrxExperts`, not a `use_experts_implementation` class) keep three 2-D parameters
  in `ffn.experts.mlp`: `w1` (gate), `v1` (up) and `w2` (down, stored transposed), each
  [E·I, H] with expert e's rows at [e·I, (e+1)·I); `DbrxExpertStore` reads them.
- Everything MoE lives in the sub-config `config.ffn_config` (`moe_num_experts`, `moe_top_k`,
  `ffn_hidden_size`, `ffn_act_fn`), which the router and experts are built from: the expert-count
  key is the dotted `ffn_config.moe_num_experts`, and `DbrxExpertStore.kept_state` gives surgery the
  kept experts' row blocks. `DbrxExperts` returns [N, 1, H] for 2-D input. No shared experts;
  every layer is MoE.
"""

from __future__ import annotations

import torch

from moepress.models.base import ExpertStore, MoEBlock, RouteResult, Routing, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family


class DbrxExpertStore(ExpertStore):
    """`DbrxExperts`: `mlp.w1`/`mlp.v1`/`mlp.w2` of shape [E·I, H], expert-major rows."""

    def __init__(self, module):
        super().__init__(module, module.mlp.activation_fn)

    @property
    def num_experts(self) -> int:
        return self.module.mlp.w1.shape[0] // self.module.ffn_hidden_size

    def weights(self, e: int):
        rows = slice(e * self.module.ffn_hidden_size, (e + 1) * self.module.ffn_hidden_size)
        mlp = self.module.mlp
        return mlp.w1[rows], mlp.v1[rows], mlp.w2[rows].T

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up, down = self.weights(e)
        return (self.act_fn(x.matmul(gate.T)) * x.matmul(up.T)).matmul(down.T)

    def kept_state(self, kept: list[int]) -> dict[str, torch.Tensor]:
        """The experts module's state with only experts `kept`: their row blocks of w1, v1 and w2."""
        inter = self.module.ffn_hidden_size
        rows = torch.tensor([e * inter + r for e in kept for r in range(inter)], dtype=torch.long)
        mlp = self.module.mlp
        return {f"mlp.{n}": getattr(mlp, n).index_select(0, rows.to(mlp.w1.device)) for n in ("w1", "v1", "w2")}


class DbrxBlock(MoEBlock):
    """Softmax, top-k, weights divided by their `moe_normalize_expert_weights`-norm."""

    p_norm: float | None = None

    @property
    def router(self):
        return self.module.router  # `DbrxRouter`, built from the config, owns `layer.weight`

    def route(self, x, active=None, logits=None) -> RouteResult:
        logits, ids, _ = self.active_logits(x, active, logits)
        k = self.routing.top_k
        scores = logits.softmax(dim=-1)
        weights, local = torch.topk(scores, k, dim=-1)
        if self.p_norm is not None:
            weights = weights / torch.norm(weights, p=self.p_norm, dim=-1, keepdim=True)
        return RouteResult(logits=logits, scores=scores, weights=weights, index=ids[local])


class DbrxAdapter(DeclaredAdapter):
    """The router weight is `ffn.router.layer.weight`; routing facts live in `config.ffn_config`."""

    def block(self, layer_idx, layer):
        ffn = layer.ffn
        block = DbrxBlock(
            layer_idx=layer_idx,
            module=ffn,
            router_weight=ffn.router.layer.weight,
            routing=Routing(scoring="softmax", top_k=ffn.top_k, norm_topk=False, logits_in_fp32=False),
            experts=DbrxExpertStore(ffn.experts),
        )
        block.p_norm = ffn.moe_normalize_expert_weights
        return block


def _tiny(cfg) -> None:
    cfg.attn_config.kv_n_heads, cfg.attn_config.clip_qkv = 2, 8.0
    cfg.attn_config.rope_theta = 500000.0  # read by DbrxAttention; real configs carry it, the default lacks it
    ffn = cfg.ffn_config
    ffn.hidden_size, ffn.ffn_hidden_size, ffn.moe_num_experts, ffn.moe_top_k = cfg.d_model, 16, 8, 2


_SPEC = Family(
    name="dbrx",
    model_types=("dbrx",),
    routing=lambda router, config: Routing(scoring="softmax", top_k=2, norm_topk=True),  # DbrxAdapter's is used
    num_experts_key="ffn_config.moe_num_experts",
    mlp=("ffn",),
    layers="transformer.blocks",
    norm="transformer.norm_f",
    router="router",
    tiny=_tiny,
)
FAMILIES[_SPEC.name] = _SPEC
register_adapter(DbrxAdapter(_SPEC))
