"""DeepSeek-V4 with a hash-routed layer (`mlp_layer_types[0] == "hash_moe"`): the expert view covers the
score-routed layers only, every method keeps the hash-routed layer (its token -> expert table) as it is,
a plan that changes it is refused with the reason, and pruning the others is written with its structure
(the config's one expert count also sizes the hash-routed layer)."""

from __future__ import annotations

import json

import pytest
import torch

import moepress
from moepress.errors import MoepressError
from moepress.io import save_compressed
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Drop, Prune
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(3))


def hashed_model(**overrides):
    """Tiny DeepSeek-V4 whose layer 0 is hash-routed, its tid2eid spread over all 8 experts."""
    model = tiny_model("deepseek_v4", mlp_layer_types=["hash_moe", "moe", "moe"], **overrides)
    gate = model.model.layers[0].mlp.gate
    g = torch.Generator().manual_seed(5)
    table = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(gate.tid2eid.shape[0])])
    gate.tid2eid.copy_(table)
    return model


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_hash_layer_is_left_out_of_the_view():
    model = hashed_model()
    adapter = get_adapter(model)
    assert adapter.moe_layer_ids(model) == [1, 2]
    assert list(adapter.unviewed_moe_layers(model)) == [0]
    for block in adapter.blocks(model).values():
        x = torch.randn(3, 7, block.hidden_size)
        with torch.no_grad():
            torch.testing.assert_close(block.forward(x), block.module(x), rtol=1e-5, atol=1e-6)


def test_score_routing_is_the_family_s_in_bfloat16():
    model = tiny_model("deepseek_v4", dtype=torch.bfloat16)
    for block in get_adapter(model).blocks(model).values():
        x = torch.randn(11, block.hidden_size, dtype=torch.bfloat16)
        with torch.no_grad():
            _, weights, index = block.module.gate(x)
            route = block.route(x)
        torch.testing.assert_close(route.index.sort(-1).values, index.sort(-1).values, rtol=0, atol=0)
        order = route.index.argsort(-1), index.argsort(-1)
        torch.testing.assert_close(route.weights.gather(1, order[0]), weights.gather(1, order[1]), rtol=0, atol=0)


@pytest.mark.parametrize("action", [Drop(), Prune(keep_experts=[0, 1, 2, 3])])
def test_plan_changing_the_hash_layer_is_refused(action):
    model = hashed_model()
    plan = CompressionPlan(method="test", layers={0: action})
    with pytest.raises(MoepressError, match="token id") as err:
        apply_plan(model, plan)
    assert "\n" not in str(err.value)


def test_uniform_pruning_keeps_the_hash_layer_and_round_trips(tmp_path):
    model = hashed_model()
    table = model.model.layers[0].mlp.gate.tid2eid.clone()
    plan = CompressionPlan(method="test", layers={i: Prune(keep_experts=[0, 2, 3, 4, 6, 7]) for i in (1, 2)})
    compressed = apply_plan(model, plan)
    want = _logits(compressed)
    out = save_compressed(compressed, plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 8 and "moepress_structure" in config  # the hash layer keeps 8
    loaded = moepress.load(out)
    assert torch.equal(loaded.model.layers[0].mlp.gate.tid2eid, table)
    assert loaded.model.layers[1].mlp.experts.gate_up_proj.shape[0] == 6
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,budget", [("frequency", {"ratio": 0.25}), ("mone", {"ratio": 0.25}),
                                           ("layer-drop", {"layers": 1})])
def test_methods_keep_the_hash_layer(method, budget, tmp_path):
    from moepress.pipeline import byte_tokenizer

    from .conftest import SHARED

    model = hashed_model(vocab_size=260, max_position_embeddings=1024)
    source = tmp_path / "src"
    model.save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    out = moepress.compress(source, method, tmp_path / method, data=SHARED / "data" / "calib.txt", n=4, seq_len=32,
                            device="cpu", **budget)
    loaded = moepress.load(out)
    assert torch.equal(loaded.model.layers[0].mlp.gate.tid2eid, model.model.layers[0].mlp.gate.tid2eid)
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8
    generated = loaded.generate(torch.tensor([[1, 70, 71]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_score_routed_layers_calibrate_on_the_fused_path(monkeypatch):
    """The decoder layer passes `input_ids` to every block; score-routed blocks ignore them, so their
    calibration computes each expert output once (and gives the whole-model statistics)."""
    from moepress.calibrate import calibrate, calibrate_hooked, runner

    from .test_calibrate import assert_stats_close

    calls = []
    fused = runner._fused_forward
    monkeypatch.setattr(runner, "_fused_forward", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model = tiny_model("deepseek_v4")
    ids = torch.randint(3, 100, (4, 24), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, batch_size=2).stats
    assert calls
    assert_stats_close(stats, calibrate_hooked(model, ids, batch_size=2), rtol=1e-5)
