"""Qwen3-Next (`qwen3_next`), Qwen3.5-MoE (`qwen3_5_moe`, `qwen3_5_moe_text`), Qwen4-Exp (`qwen4_exp`,
`qwen4_exp_text`) and Lara-Mini (`lara_mini`): hybrid-attention decoders (Gated DeltaNet and full,
indexed or sliding attention layers) whose every layer has a Qwen-style MoE block.

Routing as Qwen3-MoE: logits in the activations' dtype, softmax in float32, top-k, renormalised, the
weights cast back. Quirks:
- Qwen3-Next and Qwen4-Exp renormalise only when `norm_topk_prob`; Qwen3.5-MoE's router has no such
  flag and ALWAYS renormalises (reading a missing flag as False was why its block did not match).
- Qwen3-Next, Qwen3.5 and Qwen4-Exp: one shared expert scaled per token by
  `sigmoid(shared_expert_gate(x))`, as Qwen2-MoE.
- Qwen4-Exp's decoder layers add hyper-connections and PLE around the block; the block itself is
  Qwen3-Next's. Its `qwen4_exp` (VLM) config builds the text-only causal LM.
- Lara-Mini computes the router logits in float32, casts the weights back to the activations' dtype,
  and adds its shared expert in full (no gate).
"""

from __future__ import annotations

from moepress.models.base import Routing
from moepress.models.declared import Family, declare


def qwen_routing(router, config) -> Routing:
    return Routing(
        scoring="softmax",
        top_k=router.top_k,
        norm_topk=bool(getattr(router, "norm_topk_prob", False)),
        logits_in_fp32=False,
        weights_to_logits_dtype=True,
    )


def qwen3_5_routing(router, config) -> Routing:
    """Qwen3.5-MoE's router renormalises the top-k weights unconditionally."""
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=True, logits_in_fp32=False,
                   weights_to_logits_dtype=True)


def lara_routing(router, config) -> Routing:
    return Routing(scoring="softmax", top_k=router.top_k, norm_topk=bool(router.norm_topk_prob),
                   logits_in_fp32=True, weights_to_logits_dtype=True)


def _hybrid(layer_types: list[str]):
    """Three layers of the given attention kinds (every one MoE), small linear-attention heads."""

    def tiny(cfg) -> None:
        text = getattr(cfg, "text_config", cfg)
        text.layer_types = list(layer_types)
        for key, value in dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                               linear_value_head_dim=8, linear_conv_kernel_dim=4, mlp_only_layers=[],
                               decoder_sparse_step=1, sliding_window=4, hc_lowrank=8, indexer_n_heads=2,
                               indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                               indexer_compress_ratio=2).items():
            if hasattr(text, key):
                setattr(text, key, value)

    return tiny


_hybrid_tiny = _hybrid(["linear_attention", "full_attention", "linear_attention"])


def _qwen4_tiny(cfg) -> None:
    """Linear, sparse (indexed), linear attention; the sparse kind is named as the installed release names
    it (`qwen_sparse_attention` before transformers 5.18, `indexed_attention` since)."""
    text = getattr(cfg, "text_config", cfg)
    sparse = next(t for t in type(text)().layer_types if t != "linear_attention")  # the full-size default
    _hybrid(["linear_attention", sparse, "linear_attention"])(cfg)

declare(Family(
    name="qwen3_next",
    model_types=("qwen3_next",),
    routing=qwen_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
    tiny=_hybrid_tiny,
))

declare(Family(
    name="qwen3_5_moe",
    model_types=("qwen3_5_moe_text", "qwen3_5_moe"),
    routing=qwen3_5_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
    tiny=_hybrid_tiny,
))

declare(Family(
    name="qwen4_exp",
    model_types=("qwen4_exp_text", "qwen4_exp"),
    routing=qwen_routing,
    shared="shared_expert",
    shared_gate="shared_expert_gate",
    norm=("model.hyper_connection_mixer",),  # mixes the streams (a normed, gated mean): no final norm
    tiny=_qwen4_tiny,
))

declare(Family(
    name="lara_mini",
    since="5.24",
    model_types=("lara_mini",),
    routing=lara_routing,
    shared="shared_expert",
    tiny=_hybrid(["linear_attention", "sliding_attention", "full_attention"]),
))
