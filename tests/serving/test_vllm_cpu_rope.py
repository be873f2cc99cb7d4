"""Why the DeepSeek serving tests swap vLLM's CPU rotary op for its PyTorch one (`helpers._mla_rope_reference`):
on MLA's strided rope slices the op disagrees with vLLM's own reference. When a vLLM release fixes it this test
fails, and the swap can go."""

from __future__ import annotations

import torch


def test_vllm_cpu_rope_on_mla_slices():
    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        # DeepSeek's rope: 64 dims, GPT-J style (is_neox_style=False), as vLLM's DeepseekV2MLAAttention builds it
        rope = RotaryEmbedding(64, 64, 512, 10000.0, False, torch.float32)
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(6)
    q = torch.randn(6, 2, 128, generator=g)  # per head: 64 "nope" dims, then 64 rope dims
    kv_a = torch.randn(6, 576, generator=g)  # kv_a_proj_with_mqa's output: 512 latent dims, then 64 rope dims
    q_pe, k_pe = q[..., 64:], kv_a[:, 512:].unsqueeze(1)  # the slices MLA hands the op, as vLLM's mla.py does
    want_q, want_k = rope.forward_native(positions, q_pe.clone(), k_pe.clone())
    ops.rotary_embedding(positions, q_pe, k_pe, 64, rope.cos_sin_cache, False)  # in place
    assert not torch.allclose(q_pe, want_q, atol=1e-3)
    assert not torch.allclose(k_pe, want_k, atol=1e-3)
