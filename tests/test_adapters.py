"""The MoEBlock view reproduces every family's own MoE block, and inspect counts match the config."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moepress.errors import MoepressError
from moepress.inspect import summarize
from moepress.models import get_adapter, supported_families
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import MINI_MODELS, mini_model_path


def _check_block_equivalence(model):
    adapter = get_adapter(model)
    torch.manual_seed(0)
    for block in adapter.blocks(model).values():
        x = torch.randn(3, 7, block.hidden_size)
        with torch.no_grad():
            ref = block.module(x)
            ours = block.forward(x)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        assert ref.abs().max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_block_reimplementation_matches_model(family):
    _check_block_equivalence(tiny_model(family))


def test_group_limited_deepseek_v2_routing_matches():
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    assert get_adapter(model).blocks(model)[1].routing.n_group == 4
    _check_block_equivalence(model)


def test_remote_code_modulelist_experts_match(remote_code_model):
    adapter = get_adapter(remote_code_model)
    assert adapter.family.startswith("deepseek_moe")
    _check_block_equivalence(remote_code_model)


def test_unsupported_family_lists_supported():
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(MoepressError) as err:
        get_adapter(LlamaForCausalLM(cfg))
    msg = str(err.value)
    assert "llama" in msg and all(f in msg for f in supported_families())
    assert "\n" not in msg


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_inspect_counts_match_config(family):
    model = tiny_model(family)
    s = summarize(model)
    cfg = model.config
    assert s.num_layers == cfg.num_hidden_layers
    assert s.top_k == cfg.num_experts_per_tok
    adapter = get_adapter(model)
    assert s.routed_experts == getattr(cfg, adapter.num_experts_key)
    assert s.parameters["total"] == sum(p.numel() for p in model.parameters())
    e, h, i = s.routed_experts, cfg.hidden_size, s.expert_intermediate
    assert s.parameters["routed_experts"] == len(s.moe_layers) * e * 3 * h * i
    assert s.parameters["router"] == len(s.moe_layers) * e * h


@pytest.mark.parametrize("name", MINI_MODELS)
def test_inspect_bundled_checkpoints(name):
    import json

    from moepress.models.loading import load_model

    path = mini_model_path(name)
    cfg = json.loads((path / "config.json").read_text())
    model, _ = load_model(path, dtype="bfloat16")
    s = summarize(model)
    assert s.num_layers == cfg["num_hidden_layers"]
    assert s.routed_experts == cfg.get("n_routed_experts", cfg.get("num_experts"))
    assert s.top_k == cfg["num_experts_per_tok"]
    assert len(s.moe_layers) == cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    assert s.parameters["total"] == json.loads((path / "training.json").read_text())["params"]
    # bf16, except what transformers keeps in float32 (DeepSeek-V2's router since transformers 5.2x)
    fp32 = sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)
    assert fp32 <= s.parameters["router"]
    assert s.bytes["total"] == 2 * s.parameters["total"] + 2 * fp32
    _check_block_equivalence(model.float())
