"""CD-MoE: fixed condensation weights, greedy expert and layer search (against a naive reference that
runs the whole model per candidate), the recorded curve, memory budgets, light fine-tuning.

The naive searches here score next-token distributions (moepress's `metric="vocab-js"` variant, and
kl / ppl); the reference code's defaults are pinned in test_cd_moe_reference.py."""

from __future__ import annotations

import copy

import pytest
import torch

from moepress.calibrate.stats import LayerStats
from moepress.errors import MoepressError
from moepress.evaluate.divergence import divergence_sums
from moepress.methods.cd_moe import cd_moe, prefix_plan
from moepress.methods.greedy_search import GreedySearch, RoutingMass, condense_action, condense_weights
from moepress.methods.search_registry import available_search_methods, get_search_method
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Condense, Drop, LayerAction
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import family_case, mini_model_path


def _model(family: str = "deepseek_v2", layers: int = 4, seed: int = 0):
    extra = {"layer_types": ["full_attention"] * layers} if family.startswith("qwen") else {}
    return tiny_model(family, seed=seed, num_hidden_layers=layers, **extra)


def _ids(n: int = 6, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(seed))


# ---- naive reference: the whole model per candidate, MLPs replaced by forward hooks ------------------
def _hooked_logits(model, ids: torch.Tensor, actions: dict[int, LayerAction]) -> torch.Tensor:
    blocks = get_adapter(model).blocks(model)
    handles = [
        blocks[i].module.register_forward_hook(lambda _m, args, _out, b=blocks[i], a=a: b.forward(args[0], a))
        for i, a in actions.items()
    ]
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def _naive_metric(model, ids, reference: torch.Tensor, actions: dict[int, LayerAction], metric: str) -> float:
    logits = _hooked_logits(model, ids, actions)
    if metric == "ppl":
        vocab = logits.shape[-1]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        return float(torch.exp(nll))
    sums = divergence_sums(reference, logits)
    return (sums.js if metric == "js" else sums.kl) / sums.tokens


def _naive_search(model, ids, experts: int, layers: int, metric: str = "js", drop: bool = False):
    """CD-MoE exactly as the paper's scripts run it: every candidate is a whole-model forward."""
    blocks = get_adapter(model).blocks(model)
    reference = _hooked_logits(model, ids, {})
    actions: dict[int, LayerAction] = {}
    expert_orders = {}
    for i, block in blocks.items():
        stats = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
        hook = lambda _m, args, s=stats, b=block: s.update(b, args[0])  # noqa: E731
        handle = block.module.register_forward_pre_hook(hook)
        _hooked_logits(model, ids, {})
        handle.remove()
        weights = condense_weights(stats, "all")
        pool = [e for e in range(block.num_experts) if weights[e] > 0]
        order: list[int] = []
        for _ in range(min(experts, len(pool))):
            scores = [
                (_naive_metric(model, ids, reference, {i: condense_action(order + [e], weights)}, metric), e)
                for e in pool
                if e not in order
            ]
            order.append(min(scores)[1])
        expert_orders[i] = order
        actions[i] = Drop() if drop else condense_action(order, weights)
    chosen: dict[int, LayerAction] = {}
    curve = []
    for _ in range(layers):
        scores = [
            (_naive_metric(model, ids, reference, {**chosen, m: actions[m]}, metric), m)
            for m in sorted(blocks)
            if m not in chosen
        ]
        value, m = min(scores)
        chosen[m] = actions[m]
        curve.append(value)
    return list(chosen), curve, {m: chosen[m] for m in chosen}, expert_orders


def _assert_same_actions(found: dict, expected: dict) -> None:
    """Same layers, actions and experts; weights equal up to float rounding (batches differ)."""
    assert list(found) == list(expected)
    for i, a in expected.items():
        b = found[i]
        assert type(b) is type(a)
        if isinstance(a, Condense):
            assert b.experts == a.experts and b.keep_shared == a.keep_shared
            assert b.weights == pytest.approx(a.weights, rel=1e-5)


# ---- fixed weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_condensing_all_experts_with_a_tokens_router_weights_reproduces_the_layer(family):
    """On a single calibration token the fixed weights ARE that token's router weights, so a layer
    condensed with every expert computes exactly what the MoE block computes for it."""
    model = _model(family, layers=3)
    i, block = next(iter(get_adapter(model).blocks(model).items()))
    x = torch.randn(5, block.hidden_size, generator=torch.Generator().manual_seed(1))
    for mode in ("all", "routed"):
        for t in range(x.shape[0]):
            stats = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
            stats.update(block, x[t : t + 1])
            action = condense_action(list(range(block.num_experts)), condense_weights(stats, mode))
            with torch.no_grad():
                torch.testing.assert_close(block.forward(x[t : t + 1], action), block.forward(x[t : t + 1]))


def test_fixed_weights_are_means_over_all_tokens_or_routed_tokens():
    model = _model("olmoe", layers=3)
    i, block = next(iter(get_adapter(model).blocks(model).items()))
    x = torch.randn(40, block.hidden_size, generator=torch.Generator().manual_seed(2))
    mass = RoutingMass.zeros(block.num_experts)
    stats = LayerStats(i, block.num_experts, block.hidden_size, block.top_k)
    for part in x.split(16):  # batches merge to the same sums
        mass.update(block, part)
    stats.update(block, x)
    route = block.route(x)
    dense = torch.zeros(40, block.num_experts, dtype=torch.float64)
    dense.scatter_(1, route.index, route.weights.double())
    routed = dense.sum(0) / (dense > 0).sum(0).clamp(min=1)
    for source in (mass, stats):
        torch.testing.assert_close(condense_weights(source, "all"), dense.mean(0))
        torch.testing.assert_close(condense_weights(source, "routed"), routed)


# ---- expert search ----------------------------------------------------------------------------------
def test_expert_search_first_picks_the_expert_that_carries_the_routed_output():
    model = _model("deepseek_v2", layers=3)
    blocks = get_adapter(model).blocks(model)
    layer, block = max(blocks.items())
    carrier = block.num_experts - 1  # the highest id: a tie-break could never pick it by accident
    with torch.no_grad():
        for e in range(block.num_experts):
            if e != carrier:
                block.experts.module.down_proj[e].zero_()
    search = GreedySearch(model, _ids(), batch_size=3)
    weights = condense_weights(search.stats[layer], "all")
    assert weights[carrier] > 0
    pool = [e for e in range(block.num_experts) if weights[e] > 0]
    found = search.search_experts(layer, 2, [float(w) for w in weights], pool)
    assert found.order[0] == carrier
    # with the carrier in, every other expert adds exactly nothing: all tie, the lowest id wins
    assert found.order[1] == min(e for e in pool if e != carrier)
    assert found.curve[1] == pytest.approx(found.curve[0], abs=1e-7)


# ---- the fast search is the naive search ------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "experts", "metric", "per_forward"),
    [
        ("deepseek_v2", 2, "js", 1),
        ("qwen2_moe", 2, "js", 3),
        ("olmoe", 1, "kl", 2),
        ("deepseek_v2", 1, "ppl", 1),
    ],
)
def test_fast_search_returns_the_naive_reference_plan(family, experts, metric, per_forward):
    model = _model(family, layers=4)
    ids = _ids()
    n_moe = len(get_adapter(model).moe_layer_ids(model))
    plan = cd_moe(
        model, ids, experts=experts, layers=n_moe, metric=metric, batch_size=4,
        candidates_per_forward=per_forward, weight_mode="all",
    )
    order, curve, actions, expert_orders = _naive_search(model, ids, experts, n_moe, metric)
    assert plan.metadata["order"] == order
    _assert_same_actions(plan.layers, actions)
    assert {int(i): v["order"] for i, v in plan.metadata["experts"].items()} == expert_orders
    assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-7)
    fp = plan.metadata["forward_passes"]
    assert fp["search_layer_forwards"] < fp["naive_layer_forwards"]


def test_layer_drop_and_shared_only_match_the_naive_reference():
    model = _model("qwen2_moe", layers=4)
    ids = _ids()
    for variant, kwargs in (("layer-drop", {"drop": True}), ("cd-moe-s", {})):
        plan = get_search_method(variant)(model, ids, layers=3, batch_size=3, metric="vocab-js")
        order, curve, actions, _ = _naive_search(model, ids, 0, 3, **kwargs)
        assert plan.method == variant
        assert plan.metadata["order"] == order
        _assert_same_actions(plan.layers, actions)
        assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-7)


def test_forward_pass_counts_follow_the_documented_formulas():
    model = _model("deepseek_v2", layers=4)  # layer 0 dense, MoE layers 1..3, 8 experts
    plan = cd_moe(model, _ids(), experts=2, layers=2, batch_size=3, metric="vocab-js")
    fp = plan.metadata["forward_passes"]
    L = 4
    pools = {int(i): v["pool"] for i, v in plan.metadata["experts"].items()}
    c = {i: p + (p - 1) for i, p in pools.items()}  # 2 greedy picks among P
    m1, _ = plan.metadata["order"]
    fast = L + sum(c[i] * (L - 1 - i) for i in c) + sum(L - 1 - m for m in (1, 2, 3)) + (L - 1 - m1)
    fast += sum(L - 1 - m for m in (1, 2, 3) if m != m1)
    assert fp["search_layer_forwards"] == fast
    assert fp["naive_layer_forwards"] == L * (1 + sum(c.values()) + 3 + 2)
    assert fp["metric_evals"] == 1 + sum(c.values()) + 3 + 2


# ---- the layer search's curve ------------------------------------------------------------------------
def test_recorded_curve_is_the_js_of_each_cumulative_model_and_does_not_decrease():
    model = _model("deepseek_v2", layers=5, seed=3)
    ids = _ids(seed=3)
    plan = cd_moe(model, ids, experts=1, layers=4, batch_size=3, metric="vocab-js")
    reference = _hooked_logits(model, ids, {})
    for n in range(1, 5):
        prefix = prefix_plan(plan, n)
        measured = _naive_metric(model, ids, reference, dict(prefix.layers), "js")
        assert plan.metadata["curve"][n - 1] == pytest.approx(measured, rel=1e-4)
    curve = plan.metadata["curve"]
    assert all(a <= b for a, b in zip(curve, curve[1:], strict=False))


def test_recorded_curve_on_a_trained_mini_model_does_not_decrease():
    from transformers import AutoModelForCausalLM

    from moepress.data import load_tokens
    from moepress.models.loading import load_tokenizer

    path = mini_model_path("dsv2-mini")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = load_tokens(load_tokenizer(path), path.parents[1] / "data" / "calib.txt", 4, 64, seed=0).input_ids
    plan = cd_moe(model, ids, experts=0, layers=7, batch_size=4, metric="vocab-js")
    curve = plan.metadata["curve"]
    assert len(curve) == 7
    assert all(a <= b for a, b in zip(curve, curve[1:], strict=False)), curve


def test_a_shorter_search_is_a_prefix_of_a_longer_one():
    model = _model("olmoe", layers=4)
    ids = _ids()
    long = cd_moe(model, ids, experts=1, layers=3, batch_size=3)
    short = cd_moe(model, ids, experts=1, layers=2, batch_size=3)
    cut = prefix_plan(long, 2)
    assert cut.layers == short.layers
    assert cut.metadata["curve"] == pytest.approx(short.metadata["curve"])


# ---- memory budget, arguments, registry, plan round trip -------------------------------------------------
def test_memory_budget_stops_at_the_first_step_that_fits(tmp_path):
    model = _model("deepseek_v2", layers=4)
    plan = cd_moe(model, _ids(), experts=1, memory_budget=0.8, batch_size=3)
    ratios = plan.metadata["memory_ratio"]
    assert ratios[-1] <= 0.8 and all(r > 0.8 for r in ratios[:-1])
    from moepress.io.sizes import predict_bytes

    assert plan.metadata["bytes"][-1] == predict_bytes(model, plan)
    loaded = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert loaded.layers == plan.layers and loaded.metadata["order"] == plan.metadata["order"]
    with pytest.raises(MoepressError, match="out of reach"):
        cd_moe(model, _ids(), experts=1, memory_budget=0.05, batch_size=3)


def test_bad_arguments_are_user_errors():
    model = _model("deepseek_v2", layers=3)
    ids = _ids()
    for kwargs in ({}, {"layers": 1, "memory_budget": 0.5}, {"layers": 5}, {"layers": 1, "metric": "mse"},
                   {"layers": 1, "weight_mode": "max"}, {"memory_budget": 1.5}):
        with pytest.raises(MoepressError):
            cd_moe(model, ids, **kwargs)
    with pytest.raises(MoepressError):
        get_search_method("cd-moe-sr")(model, ids, layers=1, experts=0)
    assert {"cd-moe-s", "cd-moe-sr", "layer-drop"} <= set(available_search_methods())


def test_search_leaves_the_model_unchanged():
    model = _model("qwen2_moe", layers=3)
    before = copy.deepcopy(model.state_dict())
    ids = _ids()
    logits = model(input_ids=ids).logits
    cd_moe(model, ids, experts=1, layers=1, batch_size=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(input_ids=ids).logits, logits)
    assert all("forward" not in m.__dict__ for m in model.modules())


# ---- fine-tuning ----------------------------------------------------------------------------------------
def test_finetune_lowers_the_loss_and_changes_only_condensed_layers():
    from moepress.finetune import finetune
    from moepress.modules import CondensedMLP
    from moepress.surgery import apply_plan

    model = _model("qwen2_moe", layers=3)
    plan = CompressionPlan(
        method="cd-moe-sr",
        layers={1: Condense(experts=[0, 3], weights=[0.2, 0.1]), 2: Drop()},
    )
    apply_plan(model, plan)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = torch.arange(8 * 32).reshape(8, 32) % 17 + 3  # a short periodic text: learnable fast
    model, result = finetune(model, plan, train, train[:2], tokens=8 * 32 * 12, lr=3e-3, batch_size=8)
    assert result.steps == 12 and result.layers == [1]
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    assert result.ppl_after < result.ppl_before
    condensed = {f"model.layers.1.mlp.{k}" for k in model.model.layers[1].mlp.state_dict()}
    assert isinstance(model.model.layers[1].mlp, CondensedMLP)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= condensed
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_finetune_refuses_a_plan_that_was_not_applied():
    from moepress.finetune import finetune

    model = _model("deepseek_v2", layers=3)
    plan = CompressionPlan(method="cd-moe-s", layers={1: Condense()})
    with pytest.raises(MoepressError, match="apply the plan"):
        finetune(model, plan, _ids(), tokens=100)
    with pytest.raises(MoepressError, match="nothing to fine-tune"):
        finetune(model, CompressionPlan(method="layer-drop", layers={1: Drop()}), _ids(), tokens=100)


def test_finetune_with_gradient_checkpointing_trains_the_same():
    from moepress.finetune import finetune
    from moepress.finetune.train import _checkpointing  # either release's name for it
    from moepress.surgery import apply_plan

    plan = CompressionPlan(method="cd-moe-s", layers={2: Condense()})
    train = torch.arange(4 * 32).reshape(4, 32) % 13 + 3
    losses = []
    for checkpointing in (False, True):
        model = apply_plan(_model("deepseek_v2", layers=3), plan)
        model, result = finetune(model, plan, train, tokens=4 * 32 * 3, lr=1e-3, batch_size=4,
                                 gradient_checkpointing=checkpointing)
        assert not _checkpointing(model)  # switched off again
        losses.append(result.losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_the_no_cache_paths_score_the_same():
    """Reference log-probs recomputed per chunk and expert outputs recomputed per candidate (what
    large models fall back to) give the same expert search as the cached paths."""
    model = _model("qwen2_moe", layers=3)
    ids = _ids()
    found = []
    for budget in (2**30, 0):
        search = GreedySearch(
            model, ids, batch_size=4, reference_cache_bytes=budget, expert_cache_bytes=budget
        )
        layer = search.moe_ids[-1]
        weights = condense_weights(search.stats[layer], "all")
        pool = [e for e in range(len(weights)) if weights[e] > 0]
        found.append(search.search_experts(layer, 2, [float(w) for w in weights], pool))
    assert found[0].order == found[1].order
    assert found[0].curve == pytest.approx(found[1].curve, rel=1e-6)


# ---- layers not of the form h_mid + mlp(x) (post-MLP norm, hyper-connections) ------------------------
def _layer_outputs(model, ids, actions: dict[int, LayerAction]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every decoder layer's output and the LM head's input, the whole model run with `actions`."""
    adapter = get_adapter(model)
    outputs, handles = [], []
    for layer in adapter.layers(model):
        handles.append(layer.register_forward_hook(
            lambda _m, _args, out: outputs.append(out[0] if isinstance(out, tuple) else out)))
    blocks = adapter.blocks(model)
    for i, a in actions.items():
        b = blocks[i]
        handles.append(b.module.register_forward_hook(
            lambda _m, args, _out, b=b, a=a: b.wrap_output(b.forward(args[0], a))))
    try:
        with torch.no_grad():
            final = model.model(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    return outputs, final


def _seq_mean_js(original: torch.Tensor, candidate: torch.Tensor) -> float:
    from moepress.methods.scoring import hidden_js

    flat = lambda h: h.reshape(h.shape[0], h.shape[1], -1)  # noqa: E731 - several streams: one vector a token
    return float(hidden_js(flat(original), flat(candidate)).mean(-1).double().mean())


def _brute_force_reference_search(model, ids, experts: int, layers: int):
    """CD-MoE's default search with every candidate a whole-model forward: expert candidates scored at
    their own layer's output (the LM head's input for the last layer), layers at the LM head's input."""
    blocks = get_adapter(model).blocks(model)
    last = len(get_adapter(model).layers(model)) - 1
    original, original_final = _layer_outputs(model, ids, {})
    mass = {i: RoutingMass.zeros(b.num_experts) for i, b in blocks.items()}
    handles = [b.module.register_forward_pre_hook(lambda _m, args, i=i, b=b: mass[i].update(b, args[0]))
               for i, b in blocks.items()]
    _layer_outputs(model, ids, {})
    for h in handles:
        h.remove()
    actions, orders = {}, {}
    for i in blocks:
        weights = condense_weights(mass[i], "routed")
        pool = [e for e in range(len(weights)) if weights[e] > 0]
        order: list[int] = []
        for _ in range(min(experts, len(pool))):
            scores = []
            for e in (e for e in pool if e not in order):
                outs, final = _layer_outputs(model, ids, {i: condense_action(order + [e], weights)})
                ref, cand = (original_final, final) if i == last else (original[i], outs[i])
                scores.append((_seq_mean_js(ref, cand), e))
            order.append(min(scores)[1])
        orders[i], actions[i] = order, condense_action(order, weights)
    chosen: dict[int, LayerAction] = {}
    curve = []
    for _ in range(layers):
        scores = [(_seq_mean_js(original_final, _layer_outputs(model, ids, {**chosen, m: actions[m]})[1]), m)
                  for m in sorted(blocks) if m not in chosen]
        value, m = min(scores)
        chosen[m] = actions[m]
        curve.append(value)
    return list(chosen), curve, chosen, orders


@pytest.mark.parametrize("family", ["flex_olmo", family_case("hy_v4")])  # a post-MLP norm; 4 hyper-connection streams
def test_search_on_layers_not_of_the_residual_form_equals_the_brute_force_reference(family):
    """Such a layer is run whole per candidate, on its cached input: the plan, expert orders and curve
    are those of the search that runs the whole model per candidate."""
    model = tiny_model(family, seed=1)
    ids = _ids(n=4, length=12)
    plan = cd_moe(model, ids, experts=2, layers=2, batch_size=2)
    order, curve, actions, expert_orders = _brute_force_reference_search(model, ids, 2, 2)
    fp = plan.metadata["forward_passes"]
    assert fp["whole_layers"] == get_adapter(model).moe_layer_ids(model)  # the fallback ran
    assert plan.metadata["order"] == order
    _assert_same_actions(plan.layers, actions)
    assert {int(i): v["order"] for i, v in plan.metadata["experts"].items()} == expert_orders
    assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-9)
    assert fp["search_layer_forwards"] < fp["naive_layer_forwards"]


@pytest.mark.parametrize(("family", "kwargs"), [
    ("flex_olmo", {"experts": 1, "metric": "js"}),
    family_case("hy_v4", {"experts": 1, "metric": "kl"}),
    ("afmoe", {"experts": 0, "drop": True, "metric": "js"}),
])
def test_next_token_search_on_layers_not_of_the_residual_form_equals_the_naive_reference(family, kwargs):
    model = tiny_model(family, seed=2)
    ids = _ids(n=4, length=12)
    n_moe = len(get_adapter(model).moe_layer_ids(model))
    plan = cd_moe(model, ids, layers=n_moe, batch_size=2, weight_mode="all", **kwargs)
    order, curve, actions, expert_orders = _naive_search(model, ids, kwargs["experts"], n_moe,
                                                         kwargs["metric"], kwargs.get("drop", False))
    assert plan.metadata["forward_passes"]["whole_layers"]
    assert plan.metadata["order"] == order
    _assert_same_actions(plan.layers, actions)
    if not kwargs.get("drop"):
        assert {int(i): v["order"] for i, v in plan.metadata["experts"].items()} == expert_orders
    assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-7)
