"""LongCat-Flash (`longcat_flash`): block view, tiny config and registration.

Quirks spelled out here:
- Zero-computation experts: the router (`mlp.router.classifier`, logits in float32) scores
  `n_routed_experts + zero_expert_num` experts; ids >= `n_routed_experts` are identity experts
  (output = input, no weights). Softmax over ALL of them, `e_score_correction_bias` ([E + Z]) added
  for the choice only, the chosen unbiased scores times `routed_scaling_factor`, no renormalisation.
- The view's experts are the E real ones (`num_experts` = E); the Z identity experts are the router's
  trailing `extra_router_rows`, always active: routes may name them (ids E..E+Z-1) and their output
  is the input. A pruned layer keeps every identity expert (they cost nothing).
- `experts.gate_up_proj` has E + Z rows (the tail is never used), `experts.down_proj` only E.
- Each decoder layer has two attention/dense-MLP sublayers (`mlps`) and one MoE block (`mlp`) on a
  shortcut; the dense MLPs are not experts.

Pruning keeps the router's trailing Z rows (classifier weight, correction bias) and the experts'
trailing Z `gate_up_proj` rows after the kept experts' (`extra_router_rows`, `kept_state`).
Calibration statistics cover the E real experts only: slots routed to an identity expert count in
the block's output but in no expert's statistics (`moepress.calibrate.stats`). Novices are refused:
a pruned router's identity slots follow the kept ones, which `NoviceExperts` does not map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moepress.errors import MoepressError
from moepress.models.base import ExpertStore, MoEBlock, Routing, register_adapter
from moepress.models.declared import FAMILIES, DeclaredAdapter, Family


class LongcatExperts(ExpertStore):
    """Real experts 0..E-1 (`gate_up_proj [E+Z, 2I, H]`, `down_proj [E, H, I]`); ids E..E+Z-1 are identities."""

    def __init__(self, module):
        super().__init__(module, module.act_fn)

    @property
    def num_experts(self) -> int:
        return self.module.num_routed_experts

    def weights(self, e: int):
        if e >= self.num_experts:
            raise MoepressError(f"expert {e} is a zero-computation (identity) expert: it has no weights")
        gate_up = self.module.gate_up_proj[e]
        inter = gate_up.shape[0] // 2
        return gate_up[:inter], gate_up[inter:], self.module.down_proj[e]

    def kept_state(self, kept: list[int]) -> dict[str, torch.Tensor]:
        """The experts module's tensors with only real experts `kept`: `gate_up_proj` keeps its Z tail rows."""
        n, total = self.num_experts, self.module.total_experts
        index = torch.tensor(kept, dtype=torch.long, device=self.module.down_proj.device)
        tail = torch.cat([index, torch.arange(n, total, device=index.device)])
        return {"gate_up_proj": self.module.gate_up_proj.index_select(0, tail),
                "down_proj": self.module.down_proj.index_select(0, index)}

    def forward(self, x: torch.Tensor, e: int) -> torch.Tensor:
        if e >= self.num_experts:
            return x
        gate, up = F.linear(x, self.module.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.module.down_proj[e])


@dataclass
class LongcatBlock(MoEBlock):
    """Routes over real + identity experts; `active` (real ids) always gains the identity ids."""

    novice_refusal = "LongCat-Flash's identity experts take the router slots after the kept experts and novices"

    @property
    def extra_router_rows(self) -> int:
        return self.module.experts.zero_expert_num  # the identity experts' trailing router rows

    @property
    def router(self):
        return self.module.router  # owns the classifier and the correction bias

    @property
    def condenses_to_dense(self) -> bool:
        return False  # gate_up_proj and down_proj do not share an expert count

    def route(self, x, active=None, logits=None):
        if active is not None:
            n = self.num_experts
            active = sorted(set(active) | set(range(n, n + self.extra_router_rows)))
        return super().route(x, active, logits)


def longcat_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=False, scaling=float(router.routed_scaling_factor))


class LongcatAdapter(DeclaredAdapter):
    """The router's weight is `router.classifier.weight`, not `router.weight`."""

    def block(self, layer_idx, layer):
        mlp = layer.mlp
        return LongcatBlock(
            layer_idx=layer_idx,
            module=mlp,
            router_weight=mlp.router.classifier.weight,
            routing=longcat_routing(mlp.router, None),
            experts=LongcatExperts(mlp.experts),
            router_bias=mlp.router.classifier.bias,
            correction_bias=mlp.router.e_score_correction_bias,
        )


_TINY = dict(num_layers=3, ffn_hidden_size=64, expert_ffn_hidden_size=16, n_routed_experts=8, zero_expert_num=2,
             moe_topk=2, num_key_value_heads=4, head_dim=8, qk_head_dim=16)

SPEC = Family(
    name="longcat_flash",
    model_types=("longcat_flash",),
    routing=longcat_routing,
    num_experts_key="n_routed_experts",
    router="router",
    tiny=_TINY,
)
FAMILIES[SPEC.name] = SPEC
register_adapter(LongcatAdapter(SPEC))
