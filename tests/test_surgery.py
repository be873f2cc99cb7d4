"""Surgery: the compressed modules compute what the plan says, for every family and the remote-code model."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moepress.errors import MoepressError
from moepress.io import predict_size, size_of
from moepress.models import get_adapter
from moepress.modules import CondensedMLP, DroppedMLP, NoviceExperts
from moepress.plan import CompressionPlan, Condense, Drop, Keep, Prune
from moepress.surgery import apply_plan, diff_plans
from moepress.testing import TINY_FAMILIES, tiny_model

REMOTE = "remote_deepseek_moe"
FAMILIES = (*TINY_FAMILIES, REMOTE)



@pytest.fixture
def make(remote_code_model):
    """make(family) -> a fresh fp32 tiny model of that family (never the shared session model)."""
    return lambda family: copy.deepcopy(remote_code_model) if family == REMOTE else tiny_model(family)


def _hidden(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, n, 32, generator=torch.Generator().manual_seed(seed))


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _novice_plan(model, layer: int, keep: list[int], novices: list[int], seed: int = 0) -> CompressionPlan:
    plan = CompressionPlan(method="test", layers={layer: Prune(keep_experts=keep, novices=novices)})
    g = torch.Generator().manual_seed(seed)
    for e in novices:
        plan.set_novice(layer, e, torch.randn(32, generator=g) * 0.3)
    return plan


@pytest.mark.parametrize("family", FAMILIES)
def test_all_keep_plan_is_bit_identical(make, family):
    model = make(family)
    want = _logits(model)
    adapter = get_adapter(model)
    plan = CompressionPlan(method="test", layers={i: Keep() for i in range(len(adapter.layers(model)))})
    apply_plan(model, plan)
    assert torch.equal(_logits(model), want)
    assert getattr(model.config, "moepress_structure", None) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_keeping_every_expert_is_identical(make, family):
    model = make(family)
    want = _logits(model)
    adapter = get_adapter(model)
    plan = CompressionPlan(
        method="test", layers={i: Prune(keep_experts=list(range(8))) for i in adapter.moe_layer_ids(model)}
    )
    apply_plan(model, plan)
    assert torch.equal(_logits(model), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_block_with_novices_matches_the_view(make, family):
    """The rebuilt block (family router with fewer rows, experts, novices) = MoEBlock.forward of the plan."""
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[-1]
    view = copy.deepcopy(adapter.block(i, adapter.layers(model)[i]))
    plan = _novice_plan(model, i, keep=[0, 3, 4, 6], novices=[2, 7])
    x = _hidden()
    with torch.no_grad():
        want = view.forward(x, plan.layers[i], plan.novices(i))
        apply_plan(model, plan)
        got = adapter.layers(model)[i].mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _router_choice(family: str, router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) from a family's own router module, sorted by index per token."""
    out = router(x.reshape(-1, x.shape[-1]))
    index, weights = (out[0], out[1]) if family == REMOTE else (out[2], out[1])
    order = index.argsort(dim=-1)
    return index.gather(1, order), weights.float().gather(1, order)


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_after_pruning_is_the_family_rule_over_remaining_experts(make, family):
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[-1]
    view = copy.deepcopy(adapter.block(i, adapter.layers(model)[i]))
    keep, novices = [0, 2, 3, 5], [6, 7]  # 6 of 8: divisible by DeepSeek-V3's 2 groups
    active = sorted(keep + novices)
    apply_plan(model, _novice_plan(model, i, keep, novices))
    x = _hidden(64)
    with torch.no_grad():
        index, weights = _router_choice(family, adapter.layers(model)[i].mlp.gate, x)
        route = view.route(x.reshape(-1, 32), active=active)
    order = route.index.argsort(dim=-1)
    # the pruned router numbers its rows 0..5; slot s is original expert active[s]
    assert torch.equal(torch.tensor(active)[index], route.index.gather(1, order))
    torch.testing.assert_close(weights, route.weights.float().gather(1, order), rtol=1e-6, atol=1e-6)

    # and the rule itself, written out: softmax families renormalise scores over the remaining rows
    if view.routing.scoring == "softmax":
        logits = x.reshape(-1, 32).double() @ view.router_weight[active].double().T
        probs = logits.softmax(-1).gather(1, index)
        if view.routing.norm_topk:
            probs = probs / probs.sum(-1, keepdim=True)
        torch.testing.assert_close(weights.double(), probs * view.routing.scaling, rtol=1e-5, atol=1e-6)
    else:  # DeepSeek-V3: sigmoid scores, top-k renormalised to sum 1, then scaled
        torch.testing.assert_close(
            weights.sum(-1), torch.full((64,), view.routing.scaling), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_condense_with_one_tokens_router_weights_reproduces_that_token(make, family):
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[0]
    layer = adapter.layers(model)[i]
    view = adapter.block(i, layer)
    x = _hidden(5)[:, 2:3]  # one token
    with torch.no_grad():
        want = layer.mlp(x)
        route = view.route(x.reshape(1, 32))
    weights = [0.0] * view.num_experts
    for e, w in zip(route.index[0].tolist(), route.weights[0].tolist(), strict=True):
        weights[e] = w
    plan = CompressionPlan(
        method="test", layers={i: Condense(experts=list(range(view.num_experts)), weights=weights)}
    )
    apply_plan(model, plan)
    assert isinstance(layer.mlp, CondensedMLP)
    with torch.no_grad():
        got = layer.mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", REMOTE])
def test_condense_without_shared_keeps_routed_rows_only(make, family):
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[0]
    view = copy.deepcopy(adapter.block(i, adapter.layers(model)[i]))
    action = Condense(experts=[1, 4, 6], weights=[0.5, -0.25, 1.5], keep_shared=False)
    # the CondensedMLP itself: without its gated shared expert, Qwen2-MoE's layer would otherwise become
    # the family's own dense MLP (tests/test_dense_layers.py)
    apply_plan(model, CompressionPlan(method="test", layers={i: action}), dense_layers="never")
    mlp = adapter.layers(model)[i].mlp
    assert mlp.shared_rows == 0 and mlp.shared_gate is None
    assert mlp.gate_proj.weight.shape[0] == 3 * view.expert_intermediate
    x = _hidden()
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), view.forward(x, action), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_novice_holding_an_experts_output_reproduces_it_on_that_input(make, family):
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[-1]
    layer = adapter.layers(model)[i]
    view = adapter.block(i, layer)
    c = _hidden(1, seed=3)
    x = c.expand(1, 4, 32).contiguous()  # a constant input
    with torch.no_grad():
        want = layer.mlp(x)
        e = view.route(c.reshape(1, 32)).index[0, 0].item()  # an expert this input does use
        vector = view.expert(c.reshape(1, 32), e)[0]
    plan = CompressionPlan(
        method="test", layers={i: Prune(keep_experts=[k for k in range(8) if k != e], novices=[e])}
    )
    plan.set_novice(i, e, vector)
    apply_plan(model, plan)
    with torch.no_grad():
        got = layer.mlp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", REMOTE])
def test_drop_leaves_the_residual(make, family):
    model = make(family)
    adapter = get_adapter(model)
    i = adapter.moe_layer_ids(model)[0]
    apply_plan(model, CompressionPlan(method="test", layers={i: Drop()}))
    layer = adapter.layers(model)[i]
    assert isinstance(layer.mlp, DroppedMLP)
    assert not any(True for _ in layer.mlp.parameters())
    x = _hidden()
    assert torch.equal(layer.mlp(x), torch.zeros_like(x))
    _logits(model)  # the model still runs


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_every_experts_implementation_skips_novice_slots(make, family):
    """Novices reach the experts class as the expert-parallel sentinel; all implementations agree."""
    model = make(family)
    adapter = get_adapter(model)
    first, last = adapter.moe_layer_ids(model)[:2]
    plan = _novice_plan(model, first, keep=[1, 2, 5, 6], novices=[0, 7])
    plan.layers[last] = Prune(keep_experts=[], novices=[0, 1, 3, 4])  # all novices: no expert GEMM at all
    for e in plan.layers[last].novices:
        plan.set_novice(last, e, torch.full((32,), 0.1 * e))
    x = _hidden()
    layers = adapter.layers(model)
    with torch.no_grad():
        want = {
            i: adapter.block(i, layers[i]).forward(x, plan.layers[i], plan.novices(i)) for i in (first, last)
        }
    apply_plan(model, plan)
    for impl in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(impl)
        for i in (first, last):
            assert isinstance(layers[i].mlp.experts, NoviceExperts)
            with torch.no_grad():
                torch.testing.assert_close(layers[i].mlp(x), want[i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["olmoe", REMOTE])
def test_config_records_the_result(make, family):
    model = make(family)
    adapter = get_adapter(model)
    ids = adapter.moe_layer_ids(model)
    uniform = CompressionPlan(method="test", layers={i: Prune(keep_experts=[0, 1, 2, 5, 6, 7]) for i in ids})
    apply_plan(model, uniform)
    assert getattr(model.config, adapter.num_experts_key) == 6
    assert getattr(model.config, "moepress_structure", None) is None

    model = make(family)
    uneven = CompressionPlan(method="test", layers={ids[0]: Prune(keep_experts=[0, 1, 2, 5]), ids[1]: Drop()})
    apply_plan(model, uneven)
    assert getattr(model.config, adapter.num_experts_key) == 8
    structure = model.config.moepress_structure
    assert structure["layers"][str(ids[0])] == {"action": "prune", "experts": [0, 1, 2, 5], "novices": []}
    assert structure["layers"][str(ids[1])] == {"action": "drop"}
    with pytest.raises(MoepressError, match="already compressed"):
        apply_plan(model, uneven)


def test_plan_errors_come_before_any_change():
    model = tiny_model("deepseek_v3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = [
        CompressionPlan(
            method="t", layers={1: Prune(keep_experts=[0, 1, 2, 3, 4])}
        ),  # 5 not divisible by 2 groups
        CompressionPlan(method="t", layers={1: Prune(keep_experts=[0, 9])}),  # out of range
        CompressionPlan(method="t", layers={0: Drop()}),  # layer 0 is dense
        CompressionPlan(method="t", layers={1: Prune(keep_experts=[0, 1], novices=[2, 3])}),  # no vectors
    ]
    for plan in bad:
        with pytest.raises(MoepressError):
            apply_plan(model, plan)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@st.composite
def _plans(draw, n_layers_moe: list[int], grouped: bool):
    plan = CompressionPlan(method="hypothesis")
    for i in n_layers_moe:
        kind = draw(st.sampled_from(["keep", "prune", "prune", "condense", "drop"]))
        if kind == "prune":
            size = draw(st.sampled_from([4, 6, 8] if grouped else [2, 3, 4, 5, 6, 7, 8]))
            active = draw(st.permutations(range(8)))[:size]
            n_novices = draw(st.integers(0, size))
            novices = active[:n_novices]
            plan.layers[i] = Prune(keep_experts=active[n_novices:], novices=novices)
            for e in novices:
                plan.set_novice(i, e, torch.full((32,), 0.1 * e))
        elif kind == "condense":
            experts = draw(st.lists(st.integers(0, 7), max_size=8, unique=True))
            plan.layers[i] = Condense(
                experts=experts, weights=[0.5] * len(experts), keep_shared=draw(st.booleans())
            )
        elif kind == "drop":
            plan.layers[i] = Drop()
    return plan


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_predicted_size_equals_size_after_surgery(make, family, data):
    source = make(family)
    adapter = get_adapter(source)
    plan = data.draw(_plans(adapter.moe_layer_ids(source), grouped=family == "deepseek_v3"))
    predicted = predict_size(source, plan)
    model = apply_plan(source, plan)
    assert predicted == size_of(model)
    _logits(model)


def test_diff_plans_names_layers_and_experts():
    a = CompressionPlan(
        method="m",
        layers={
            1: Prune(keep_experts=[0, 1, 2], novices=[3]),
            2: Condense(experts=[1, 2], weights=[0.5, 0.5]),
        },
    )
    a.set_novice(1, 3, torch.zeros(32))
    assert diff_plans(a, a) == []
    b = CompressionPlan(
        method="m",
        layers={
            1: Prune(keep_experts=[0, 1, 4], novices=[3]),
            2: Condense(experts=[1, 2], weights=[0.5, 0.25]),
            3: Drop(),
        },
    )
    b.set_novice(1, 3, torch.ones(32))
    assert diff_plans(a, b) == [
        "layer 1: kept experts only in a [2], only in b [4]",
        "layer 1: novice 3 vector differs (max |diff| 1)",
        "layer 2: weight of expert 2: 0.5 -> 0.25",
        "layer 3: keep -> drop",
    ]
    c = CompressionPlan(method="m", layers={1: Keep()})
    assert diff_plans(c, CompressionPlan(method="other")) == []  # an explicit keep is the default
