"""ZAYA's router reads a state carried from the previous layer's router: calibration, the CD-MoE search
(cached, stacked candidates, streamed) and compressed checkpoints route with it as the model does."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate import calibrate, calibrate_hooked
from moepress.evaluate.divergence import divergence_sums
from moepress.methods.cd_moe import cd_moe
from moepress.methods.greedy_search import condense_action, condense_weights
from moepress.methods.simulate import actions_applied
from moepress.models import get_adapter
from moepress.models.zaya import ZayaBlock
from moepress.plan import LayerAction
from moepress.testing import tiny_model

from .test_calibrate import assert_stats_close

IDS = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(0))


def _model(whole: bool = False, seed: int = 0):
    """Tiny ZAYA; `whole`: learned-looking residual scales, so no layer is of the residual form."""
    model = tiny_model("zaya", seed=seed)
    if whole:
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for layer in get_adapter(model).layers(model):
                for p in layer.post_mlp_residual_scale.parameters():
                    p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
                if layer.mlp.gate.use_eda:  # the carried state's scale (layers after the first)
                    layer.mlp.gate.router_states_scale.copy_(1 + torch.randn(12, generator=g))
    return model


def test_routing_reads_the_carried_state_in_every_layer_by_layer_run(monkeypatch):
    model = _model()
    layered = calibrate(model, IDS, batch_size=3).stats
    assert_stats_close(layered, calibrate_hooked(model, IDS, batch_size=3), rtol=1e-4)
    monkeypatch.setattr(ZayaBlock, "bind", lambda self, *args, **kwargs: self)  # routing without the state
    stateless = calibrate_hooked(model, IDS, batch_size=3)
    assert not torch.equal(stateless[1].count, layered[1].count)  # the comparison above is not vacuous


def _logits(model, actions: dict[int, LayerAction]) -> torch.Tensor:
    with torch.no_grad(), actions_applied(get_adapter(model).blocks(model), actions):
        return model(input_ids=IDS, use_cache=False).logits


def _naive_search(model, experts: int, layers: int):
    """Every candidate a whole-model forward, the blocks under their actions (state handed on)."""
    blocks = get_adapter(model).blocks(model)
    stats = calibrate_hooked(model, IDS, batch_size=2)
    reference = _logits(model, {})

    def metric(actions):
        sums = divergence_sums(reference, _logits(model, actions))
        return sums.js / sums.tokens

    actions, orders = {}, {}
    for i in blocks:
        weights = condense_weights(stats[i], "all")
        pool = [e for e in range(blocks[i].num_experts) if weights[e] > 0]
        order: list[int] = []
        for _ in range(min(experts, len(pool))):
            scores = [(metric({i: condense_action(order + [e], weights)}), e) for e in pool if e not in order]
            order.append(min(scores)[1])
        orders[i], actions[i] = order, condense_action(order, weights)
    chosen, curve = {}, []
    for _ in range(layers):
        value, m = min((metric({**chosen, m: actions[m]}), m) for m in sorted(blocks) if m not in chosen)
        chosen[m] = actions[m]
        curve.append(value)
    return list(chosen), curve, orders


@pytest.mark.parametrize(("whole", "per_forward"), [(False, 1), (True, 3)])
def test_cd_moe_search_equals_whole_model_forwards(whole, per_forward):
    """Candidates (stacked `per_forward` at a time) carry their own router state through later layers."""
    model = _model(whole)
    plan = cd_moe(model, IDS, experts=2, layers=3, metric="vocab-js", batch_size=2, weight_mode="all",
                  candidates_per_forward=per_forward)
    order, curve, orders = _naive_search(model, 2, 3)
    assert bool(plan.metadata["forward_passes"].get("whole_layers")) == whole
    assert plan.metadata["order"] == order
    assert {int(i): v["order"] for i, v in plan.metadata["experts"].items()} == orders
    assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-7)


def test_streamed_search_equals_in_memory(tmp_path):
    from moepress.calibrate.streaming import Streamer

    model = _model(whole=True)
    model.save_pretrained(tmp_path)
    kwargs = dict(experts=2, layers=3, batch_size=2, weight_mode="all", candidates_per_forward=2)
    memory = cd_moe(model, IDS, **kwargs)
    stream = Streamer(tmp_path, "cpu", torch.float32)
    try:
        streamed = cd_moe(stream.model, IDS, stream=stream, **kwargs)
    finally:
        stream.close()
    assert streamed.metadata["order"] == memory.metadata["order"]
    assert streamed.metadata["experts"] == memory.metadata["experts"]
    assert streamed.metadata["curve"] == pytest.approx(memory.metadata["curve"], rel=1e-6)


def test_a_pruned_router_keeps_the_skip_expert_and_slices_only_its_expert_rows():
    from moepress.plan import CompressionPlan, Drop, Prune
    from moepress.surgery import apply_plan

    model = _model()
    original = {i: (b.router.down_proj.weight.clone(), b.router.balancing_biases.clone())
                for i, b in get_adapter(model).blocks(model).items()}
    plan = CompressionPlan(method="test", layers={0: Prune(keep_experts=[1, 3, 6]), 1: Drop()})
    with torch.no_grad(), actions_applied(get_adapter(model).blocks(model), dict(plan.layers)):
        want = model(input_ids=IDS, use_cache=False).logits
    apply_plan(model, plan)
    gate = model.model.layers[0].mlp.gate
    assert gate.router_mlp.out_proj.weight.shape[0] == 4 and torch.equal(gate.down_proj.weight, original[0][0])
    assert torch.equal(gate.balancing_biases, original[0][1][[1, 3, 6, 8]])
    assert model.model.layers[1].mlp.gate is not None  # a dropped layer still hands its router state on
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS, use_cache=False).logits, want, rtol=1e-5, atol=1e-5)
