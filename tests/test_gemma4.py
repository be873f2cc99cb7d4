"""Gemma 4's MoE view: the viewed decoder layer is the stock one, and the block's re-implementation (routing
with `per_expert_scale`, the experts' input norm, the output norm) matches the stock model and surgery,
with every norm, scale and per-expert scale random (the tiny model initialises them to ones)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextDecoderLayer

from moepress.calibrate.runner import calibrate, calibrate_hooked
from moepress.methods.simulate import plan_simulated
from moepress.models import get_adapter
from moepress.models.gemma4 import Gemma4ViewedLayer
from moepress.plan import CompressionPlan, Prune
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

from .conftest import kind_plan

IDS = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(5))


def _random_model(model_type: str):
    model = tiny_model(model_type)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm_1.weight", "layernorm_2.weight", "router.scale",
                              "per_expert_scale")):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


def _stock(model):
    """The same weights in a freshly built model, whose layers were never switched to the view."""
    stock = AutoModelForCausalLM.from_config(model.config)
    stock.load_state_dict(model.state_dict())
    assert all(type(layer) is Gemma4TextDecoderLayer for layer in get_adapter(stock).layers(stock))
    return stock.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4"])
def test_viewed_layer_is_the_stock_layer(model_type):
    model = _random_model(model_type)
    stock = _stock(model)
    adapter = get_adapter(model)
    adapter.blocks(model)
    assert all(type(layer) is Gemma4ViewedLayer for layer in adapter.layers(model))
    assert model.state_dict().keys() == stock.state_dict().keys()
    assert torch.equal(_logits(model), _logits(stock))


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4"])
def test_block_matches_stock_model_and_surgery(model_type):
    model = _random_model(model_type)
    want = _logits(_stock(model))
    moe = get_adapter(model).moe_layer_ids(model)
    every = CompressionPlan(method="all", layers={i: Prune(keep_experts=list(range(8))) for i in moe})
    with plan_simulated(model, every) as simulated:  # the block's own routing and experts, every layer
        torch.testing.assert_close(_logits(simulated), want, rtol=1e-5, atol=1e-5)
    for kind in ("prune_uniform", "prune_novices", "condense", "drop", "mixed"):
        plan = kind_plan(kind, moe)
        source = copy.deepcopy(model)
        with plan_simulated(source, plan) as simulated:
            expected = _logits(simulated)
        torch.testing.assert_close(_logits(apply_plan(source, plan)), expected, rtol=1e-5, atol=1e-5)


def test_calibration_sees_every_moe_layer():
    """Layer-by-layer statistics reach every view and equal those of whole-model forwards on every layer
    (each layer gets its own per-layer input, mask and rotary table; the full-attention layer has its own
    head size)."""
    model = _random_model("gemma4_text")
    heads = {layer.self_attn.head_dim for layer in get_adapter(model).layers(model)}
    assert len(heads) == 2 and model.model.embed_tokens_per_layer is not None
    layered = calibrate(model, IDS, batch_size=1).stats.layers
    hooked = calibrate_hooked(model, IDS, batch_size=1).layers
    assert sorted(layered) == sorted(hooked) == get_adapter(model).moe_layer_ids(model)
    for stats in [*layered.values(), *hooked.values()]:
        assert int(stats.count.sum()) == IDS.numel() * 2  # every token routed to its top-2
    for i in layered:
        torch.testing.assert_close(layered[i].out_mean, hooked[i].out_mean)
        torch.testing.assert_close(layered[i].weight_sum, hooked[i].weight_sum)
