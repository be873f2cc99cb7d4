"""Tiny random-initialised models of every supported family, built from real `transformers` config
classes: the fixtures for mechanics tests, the `demo-model` command and the families table. Not for
quality numbers. (`moepress.testing` re-exports all of it.)"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from moepress.models.base import get_adapter
from moepress.models.declared import FAMILIES

__all__ = [
    "TINY_FAMILIES", "declared_families", "declared_tiny_config", "randomize_routers", "tiny_config", "tiny_model",
]

_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # larger than the usual 0.02 so block outputs are O(1e-1) and equivalence tests are sensitive
    initializer_range=0.2,
)


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """Config of a 3-layer, 8-expert, hidden-32 model of `family` (a supported `model_type`)."""
    if family == "deepseek_v2":
        cfg = DeepseekV2Config(
            **_COMMON, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
            norm_topk_prob=False, routed_scaling_factor=1.0, topk_method="greedy",
        )
        cfg.num_key_value_heads = cfg.num_attention_heads  # MLA expands k/v per head
    elif family == "deepseek_v3":
        cfg = DeepseekV3Config(
            **_COMMON, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
            q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, head_dim=8,
            n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        )
        cfg.num_key_value_heads = cfg.num_attention_heads  # MLA expands k/v per head
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **_COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, shared_expert_intermediate_size=32, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[],
        )
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **_COMMON, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, decoder_sparse_step=1,
            mlp_only_layers=[0],
        )
    elif family == "olmoe":
        cfg = OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    elif family == "mixtral":
        cfg = MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)
    else:
        cfg = declared_tiny_config(family)
    text = cfg.get_text_config()
    for key, value in overrides.items():
        setattr(cfg, key, value)
        if text is not cfg:
            setattr(text, key, value)
    return cfg


# Sizes every declared family's tiny model starts from (fields a config does not have are skipped).
_GENERIC_TINY = dict(
    _COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=16, expert_intermediate_size=16,
    shared_expert_intermediate_size=32, num_experts=8, n_routed_experts=8, num_local_experts=8,
    num_experts_per_tok=2, moe_topk=2, kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_group=2, topk_group=1,
)


def declared_tiny_config(model_type: str) -> PretrainedConfig:
    """A tiny config of a declared family: the model type's default config shrunk to the generic tiny
    sizes, then the family's own `tiny` overrides (see moepress.models.declared.Family)."""
    spec = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if spec is None:
        raise ValueError(f"no tiny config for {model_type!r}")
    cfg = AutoConfig.for_model(model_type)
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        # a heterogeneous config (`per_layer_config`) refuses global reads of its per-layer fields; the
        # generic sizes go to the global values and the family's `tiny` rebuilds `per_layer_config`
        heterogeneous = getattr(c, "is_heterogeneous", False)
        if heterogeneous:
            c.allow_global_per_layer_attribute_access = True
        for key, value in _GENERIC_TINY.items():
            if hasattr(c, key):
                setattr(c, key, value)
        settable = getattr(getattr(type(c), "layer_types", None), "fset", True) is not None  # Jamba derives it
        if settable and isinstance(getattr(c, "layer_types", None), list) and c.layer_types:
            c.layer_types = (c.layer_types * c.num_hidden_layers)[: c.num_hidden_layers]
        if heterogeneous:
            c.__dict__.pop("allow_global_per_layer_attribute_access", None)  # back to transformers' default
    if callable(spec.tiny):
        spec.tiny(cfg)
    else:
        for key, value in spec.tiny.items():
            setattr(cfg, key, value)
    return cfg


def declared_families() -> tuple[str, ...]:
    """The model types of every declared family, one per family (its first)."""
    return tuple(f.model_types[0] for f in FAMILIES.values())


TINY_FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral")


def randomize_routers(model: torch.nn.Module, seed: int = 0) -> None:
    """Give routers logits of order 1 so routing is far from uniform (default init is ~0), and
    correction biases small random values, found through the family's adapter."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        blocks = get_adapter(model).blocks(model).values()
        for block in blocks:
            gates = [block.router_weight] + ([block.shared_gate.weight] if block.shared_gate is not None else [])
            for p in gates:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 * 2)
        for block in blocks:
            for b in (block.correction_bias, block.router_bias):
                if b is not None:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-initialised tiny model of `family`, in eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    randomize_routers(model, seed)
    return model.eval()
