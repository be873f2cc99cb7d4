"""dots3 (`dots3_note`, its text decoder `dots3_note_text`), rednote's DeepSeek-V3-style decoder.

Quirks spelled out here:
- The text MoE block is DeepSeek-V3's (`moepress.models.sigmoid_routing.v3_routing`: sigmoid scores,
  `e_score_correction_bias` for the choice only, group-limited top-k with top-2-sum group scores,
  chosen scores renormalised (+1e-20) when `norm_topk_prob` (True), times `routed_scaling_factor`),
  with one gated shared MLP of `n_shared_experts × shared_experts_intermediate_size` rows. Layers
  whose `mlp_layer_types` entry is "dense" have a dense MLP.
- The text config is heterogeneous (`per_layer_config`): sliding-window layers have their own
  attention sizes, and reading those fields from the global config raises. The MoE fields are global
  (every MoE block, router and experts module is built from the global text config), so a pruned
  router/experts module built from the global config with fewer experts is the family's own.
- The expert count is `n_routed_experts` (`num_local_experts` is an alias).
- `AutoModelForCausalLM` builds the text-only `Dots3NoteForCausalLM` for both model types; the
  vision tower's own (per-layer sized) MoE layers belong to the conditional-generation model only.
"""

from __future__ import annotations

from moepress.models.declared import Family, declare
from moepress.models.sigmoid_routing import moe_tiny, v3_routing

_moe_tiny = moe_tiny(n_routed_experts=8, n_shared_experts=1, shared_experts_intermediate_size=32, head_dim=16,
                     index_n_heads=2, index_head_dim=16, index_topk=4, sliding_window=4)


def _tiny(cfg) -> None:
    text = cfg.get_text_config()
    text.per_layer_config = None  # homogeneous while the generic sizes go in, rebuilt below
    _moe_tiny(cfg)
    text.layer_types = ["indexed_attention", "sliding_attention", "sliding_attention"]
    # sliding layers keep their own attention sizes, so the tiny model stays heterogeneous
    text.per_layer_config = {
        i: {"num_attention_heads": 2, "num_key_value_heads": 2, "kv_lora_rank": 8}
        for i, kind in enumerate(text.layer_types)
        if kind == "sliding_attention"
    }
    text.rope_parameters = {
        kind: {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}  # rope 8 of head 16
        for kind in set(text.layer_types)
    }
    for sub in ("vision_config", "audio_config"):  # their adapters must output the text width
        if getattr(cfg, sub, None) is not None:
            getattr(cfg, sub).adapter_out_dim = text.hidden_size


declare(Family(
    name="dots3_note",
    since="5.23",
    model_types=("dots3_note", "dots3_note_text"),
    routing=v3_routing,
    num_experts_key="n_routed_experts",
    shared="shared_experts",
    correction_bias="e_score_correction_bias",
    tiny=_tiny,
))
