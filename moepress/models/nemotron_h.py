"""Nemotron-H / Nemotron 3 (`nemotron_h`): hybrid Mamba-2 / attention / MoE stack, one mixer per layer.

- The MoE block is the layer's `mixer` (`layers_block_type[i] == "moe"`), not `mlp`; the final norm is
  `model.norm_f`.
- Routing is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`).
- Routed experts are NOT gated: `down(relu²(up x))` (`has_gate=False`, `up_proj [E, I, H]`); the
  shared MLP (`moe_shared_expert_intermediate_size` rows) is ungated too.
- With `moe_latent_size` set, the block projects tokens into a latent width (`fc1_latent_proj`)
  before the routed experts and back (`fc2_latent_proj`) after them; `LatentBlock` does the same
  around the routed sum (routing still reads the full-width tokens).
"""

from __future__ import annotations

from moepress.models.base import MoEBlock
from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import v3_routing


class LatentBlock(MoEBlock):
    def routed_out(self, x, route, novices=None):
        if self.module.config.moe_latent_size is None:
            return super().routed_out(x, route, novices)
        return self.module.fc2_latent_proj(super().routed_out(self.module.fc1_latent_proj(x), route, novices))


declare(Family(
    name="nemotron_h",
    model_types=("nemotron_h",),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    mlp=("mixer",),
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    norm="model.norm_f",
    block_cls=LatentBlock,
    tiny=dict(layers_block_type=["moe", "full_attention", "moe"], moe_shared_expert_intermediate_size=32),
))
