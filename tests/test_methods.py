"""Expert-pruning methods: exact counts, valid and reproducible plans, MoNE's choice and novices,
NAEE's search against brute force, and the ratio → count rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepress.calibrate import CalibrationStats, LayerStats, calibrate
from moepress.data.text import fingerprint_ids
from moepress.errors import MoepressError
from moepress.methods import available_methods, experts_to_prune, get_method
from moepress.methods.base import round_half_up
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Keep, Prune, model_fingerprint
from moepress.testing import tiny_model

from .conftest import DATA, mini_model_path

METHODS = ("mone", "frequency", "random", "reap", "naee", "variance", "frequency+novice", "mone-zero-novice",
           "mone-variance", "mone-frequency", "rs")
NOVICE_METHODS = {"mone", "variance", "frequency+novice", "mone-zero-novice", "mone-variance", "mone-frequency"}
GLOBAL_METHODS = {"rs"}  # one threshold over all layers: per-layer counts vary
MERGING_METHODS = ("hc-smoe", "m-smoe", "ream")  # tested in test_merging.py
FAMILIES = ("olmoe", "qwen2_moe", "deepseek_v2", "mixtral")

_CACHE: dict[str, tuple] = {}


def tiny_calibrated(family: str):
    """(model, blocks, calibration result) of a tiny model on random ids, computed once per family."""
    if family not in _CACHE:
        model = tiny_model(family)
        ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))
        meta = {"model_fingerprint": model_fingerprint(model), "data_fingerprint": fingerprint_ids(ids)}
        result = calibrate(model, ids, batch_size=2, keep_moe_inputs=96, meta=meta)
        _CACHE[family] = (model, get_adapter(model).blocks(model), result, ids)
    return _CACHE[family]


def run(name: str, result, blocks, ratio: float = 0.25, **hp) -> CompressionPlan:
    return get_method(name)(result.stats, ratio, blocks=blocks, moe_inputs=result.moe_inputs, **hp)


# ---- registry and arguments ------------------------------------------------------------------------
def test_registry_lists_every_method_and_names_them_on_error():
    assert available_methods() == sorted(METHODS + MERGING_METHODS)
    with pytest.raises(MoepressError, match="unknown method 'mnoe'; choose one of: .*mone.*naee"):
        get_method("mnoe")


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, float("nan"), True, "0.25"])
def test_ratio_outside_open_unit_interval_is_a_user_error(ratio):
    _, blocks, result, _ = tiny_calibrated("olmoe")
    with pytest.raises(MoepressError, match=r"ratio must be a number in \(0, 1\)"):
        run("mone", result, blocks, ratio=ratio)


def test_bad_hyperparameters_are_user_errors():
    _, blocks, result, _ = tiny_calibrated("olmoe")
    with pytest.raises(MoepressError, match="no hyperparameter fusion; it takes: ranking='fusion', fusion_weight=0.5"):
        run("mone", result, blocks, fusion=0.3)
    with pytest.raises(MoepressError, match="fusion_weight must be in"):
        run("mone", result, blocks, fusion_weight=1.5)
    with pytest.raises(MoepressError, match="allocation must be one of uniform, global"):
        run("mone", result, blocks, allocation="per-layer")
    with pytest.raises(MoepressError, match="seed must be"):
        run("random", result, blocks, seed=-1)
    with pytest.raises(MoepressError, match="keep_moe_inputs"):
        get_method("naee")(result.stats, 0.25)
    with pytest.raises(MoepressError, match="ratio too high"):
        run("frequency", result, blocks, ratio=0.9)  # 8 experts, top-2: at most 6 may go


# ---- ratio → count -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("experts", "top_k", "ratio", "expected"),
    [(8, 2, 0.25, 2), (60, 4, 0.25, 15), (64, 8, 0.1, 6), (64, 6, 0.5, 32), (8, 2, 0.0625, 1),
     (8, 2, 0.75, 6)],
)
def test_experts_to_prune_rounds_half_up(experts, top_k, ratio, expected):
    assert experts_to_prune(experts, top_k, ratio) == expected


def test_experts_to_prune_refuses_nothing_and_too_much():
    with pytest.raises(MoepressError, match="ratio too low.*at least 0.125"):
        experts_to_prune(8, 2, 0.05)
    with pytest.raises(MoepressError, match="ratio too high.*leaves 1, fewer than the 2.*at most 0.75"):
        experts_to_prune(8, 2, 0.85)


@settings(max_examples=300, deadline=None)
@given(
    experts=st.integers(1, 512),
    top_k=st.integers(1, 16),
    ratio=st.floats(0, 1, exclude_min=True, exclude_max=True),
)
def test_experts_to_prune_property(experts, top_k, ratio):
    top_k = min(top_k, experts)
    nearest = round_half_up(ratio * experts)
    try:
        n = experts_to_prune(experts, top_k, ratio)
    except MoepressError as err:
        too_low = nearest == 0 and "too low" in str(err)
        assert too_low or (experts - nearest < top_k and "too high" in str(err))
        return
    assert n == nearest and abs(n - ratio * experts) <= 0.5
    assert 1 <= n <= experts - top_k


# ---- every method on every family ----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_method_prunes_exactly_the_requested_experts(family, method, tmp_path):
    model, blocks, result, _ = tiny_calibrated(family)
    plan = run(method, result, blocks, ratio=0.25, seed=3)
    plan.validate_for(model)  # right ids, ≥ top_k left, novice vectors of the right shape, same model
    assert plan.method == method
    assert plan.layers.keys() == result.stats.layers.keys()
    for i, action in plan.layers.items():
        keep = action.keep_experts if isinstance(action, Prune) else list(range(8))
        gone = sorted(set(range(8)) - set(keep))
        assert plan.metadata["pruned"][str(i)] == gone
        assert len(plan.metadata["scores"][str(i)]) == 8
        if method in GLOBAL_METHODS:
            assert len(keep) >= 2  # top_k
            continue
        assert isinstance(action, Prune)
        assert len(gone) == 2  # round(0.25 × 8)
        if method in NOVICE_METHODS:
            assert action.novices == gone
            for e, v in plan.novices(i).items():
                mean = result.stats[i].out_mean[e].float()
                torch.testing.assert_close(v, torch.zeros_like(mean) if method == "mone-zero-novice" else mean)
        else:
            assert action.novices == []
    if method in GLOBAL_METHODS:
        assert sum(map(len, plan.metadata["pruned"].values())) == 2 * len(plan.layers)
    assert plan.hyperparameters["ratio"] == 0.25 and plan.hyperparameters["seed"] == 3
    assert plan.data_fingerprint == result.stats.meta["data_fingerprint"]
    assert plan.model_fingerprint == result.stats.meta["model_fingerprint"]
    saved = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert saved.to_json() == plan.to_json()
    for i in plan.layers:
        for e, v in plan.novices(i).items():
            assert torch.equal(saved.novices(i)[e], v)


def test_hyperparameters_record_defaults():
    _, blocks, result, _ = tiny_calibrated("olmoe")
    assert run("mone", result, blocks).hyperparameters == {
        "ratio": 0.25, "seed": 0, "ranking": "fusion", "fusion_weight": 0.5, "allocation": "uniform",
        "novices": True, "frequency_metric": "weight",
    }
    assert run("mone", result, blocks, ranking="mse").hyperparameters["frequency_metric"] == "count"
    assert run("variance", result, blocks).hyperparameters["fusion_weight"] == 0.0
    assert run("frequency+novice", result, blocks).hyperparameters["fusion_weight"] == 1.0
    assert run("variance", result, blocks).hyperparameters["ranking"] == "mse"
    assert run("mone-zero-novice", result, blocks).hyperparameters["novices"] == "zero"
    assert run("mone-variance", result, blocks).hyperparameters["ranking"] == "output_fluctuation"
    assert run("mone-frequency", result, blocks).hyperparameters["ranking"] == "routing_score"
    assert run("rs", result, blocks).hyperparameters["allocation"] == "global"
    assert run("naee", result, blocks).hyperparameters["exhaustive_limit"] == 5000


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_and_data_give_the_same_plan(method):
    model, blocks, _, ids = tiny_calibrated("qwen2_moe")
    plans = [run(method, calibrate(model, ids, batch_size=2, keep_moe_inputs=96), blocks, seed=7)
             for _ in range(2)]
    assert plans[0].to_json() == plans[1].to_json()
    assert plans[0].tensors.keys() == plans[1].tensors.keys()
    assert all(torch.equal(plans[0].tensors[k], plans[1].tensors[k]) for k in plans[0].tensors)


def test_random_depends_on_the_seed():
    _, blocks, result, _ = tiny_calibrated("olmoe")
    chosen = {s: run("random", result, blocks, seed=s).metadata["pruned"] for s in range(4)}
    assert len({str(v) for v in chosen.values()}) > 1


# ---- MoNE --------------------------------------------------------------------------------------------
def make_constant_expert(block, e: int, seed: int = 0) -> None:
    """Expert e reads only hidden dim 0; with x[:, 0] = 1 its output is one fixed nonzero vector."""
    g = torch.Generator().manual_seed(seed)
    gate, up, _ = block.experts.weights(e)
    with torch.no_grad():
        gate.zero_()
        up.zero_()
        gate[:, 0] = torch.randn(gate.shape[0], generator=g) + 2
        up[:, 0] = torch.randn(up.shape[0], generator=g)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_mone_prunes_a_constant_expert_first_and_its_novice_is_exact(family):
    model = tiny_model(family, seed=1)
    layer = max(get_adapter(model).moe_layer_ids(model))
    block = get_adapter(model).blocks(model)[layer]
    make_constant_expert(block, 5)
    x = torch.randn(512, block.hidden_size, generator=torch.Generator().manual_seed(2))
    x[:, 0] = 1.0
    s = LayerStats(layer, block.num_experts, block.hidden_size, block.top_k)
    with torch.no_grad():
        s.update(block, x)
    assert (s.count > 0).all() and s.count[5] > 0.1 * s.count.max()  # routed, and not rarely
    stats = CalibrationStats(layers={layer: s})

    plan = get_method("mone")(stats, 0.125)  # round(0.125 × 8) = 1 expert
    assert plan.layers[layer].novices == [5]
    assert plan.metadata["scores"][str(layer)][5] < 1e-6  # 0 up to float32 rounding of the matmuls
    with torch.no_grad():
        constant = block.expert(x[:1], 5)[0]
        assert constant.abs().max() > 1e-2
        torch.testing.assert_close(plan.novices(layer)[5], constant, rtol=1e-5, atol=1e-7)
        ref = block.forward(x)
        torch.testing.assert_close(block.forward(x, plan.layers[layer], plan.novices(layer)), ref,
                                   rtol=1e-5, atol=1e-6)
        # without its novice the same pruning changes the output: the novice is doing the work
        ablation = get_method("mone")(stats, 0.125, novices=False)
        assert ablation.layers[layer].keep_experts == [0, 1, 2, 3, 4, 6, 7]
        assert (block.forward(x, ablation.layers[layer]) - ref).abs().max() > 1e-2


def constructed_stats(freq: list[list[float]], var: list[list[float]], top_k: int = 1) -> CalibrationStats:
    """Statistics with given frequencies and output variances (hidden size 2, 1000 tokens; mean gate
    weight = frequency / 2)."""
    layers = {}
    for i, (f, v) in enumerate(zip(freq, var, strict=True)):
        e = len(f)
        s = LayerStats(i, e, 2, top_k, tokens=1000)
        s.count = torch.tensor(f, dtype=torch.float64) * 1000 * top_k
        s.weight_sum = s.count / 2
        s.out_m2 = torch.tensor(v, dtype=torch.float64)[:, None].expand(e, 2) * s.count[:, None]
        s.out_mean = torch.arange(2 * e, dtype=torch.float64).view(e, 2)
        s.out_mean[s.count == 0] = 0
        layers[i] = s
    return CalibrationStats(layers=layers, meta={"data_fingerprint": "d" * 16})


def test_mone_mse_fusion_weight_moves_between_the_two_metrics():
    # moepress's variant (ranking=mse): f̂^α·v̂^(1−α); the reference ranking is in test_mone_reference.py
    f = [0.05, 0.35, 0.10, 0.30, 0.20]
    v = [0.90, 0.05, 0.40, 0.30, 0.25]
    stats = constructed_stats([f], [v])
    assert stats[0].frequency.tolist() == pytest.approx(f, abs=1e-12)
    assert stats[0].output_variance.tolist() == pytest.approx(v, abs=1e-12)

    def first_two(name, **hp):
        return get_method(name)(stats, 0.4, **hp).metadata["pruned"]["0"]

    assert first_two("frequency+novice") == first_two("mone", ranking="mse", fusion_weight=1.0) == [0, 2]
    assert first_two("variance") == first_two("mone", ranking="mse", fusion_weight=0.0) == [1, 4]
    # f·v = [.045, .0175, .04, .09, .05]: neither the rarest (0) nor the steadiest (4) alone
    assert first_two("mone", ranking="mse") == [1, 2]
    # the reference ranks by mean weight × sqrt(trace Cov) ∝ f·sqrt(v) = [.047, .078, .063, .16, .1]
    assert first_two("mone") == [0, 2]
    scores = get_method("mone")(stats, 0.4, ranking="mse").metadata["scores"]["0"]
    expected = [math.sqrt(a / 0.35 * b / 0.9) for a, b in zip(f, v, strict=True)]
    assert scores == pytest.approx(expected, rel=1e-12)


def test_mone_dead_experts_go_first_as_zero_novices():
    stats = constructed_stats([[0.0, 0.5, 0.0, 0.5]], [[0.0, 1.0, 0.0, 2.0]])
    for ranking in ("fusion", "mse", "output_fluctuation", "routing_score"):
        plan = get_method("mone")(stats, 0.5, ranking=ranking)
        assert plan.layers[0].novices == [0, 2]
        assert all(torch.equal(v, torch.zeros(2)) for v in plan.novices(0).values())


def test_mone_mse_global_allocation_prunes_where_redundancy_is():
    flat = [0.25, 0.25, 0.25, 0.25]
    skewed = [0.01, 0.02, 0.03, 0.94]
    stats = constructed_stats([flat, skewed, flat], [[1.0] * 4, [1.0, 1.0, 1.0, 1.0], [1.0] * 4], top_k=1)
    plan = get_method("mone")(stats, 0.25, ranking="mse", allocation="global")  # round(0.25 × 12) = 3
    assert [plan.metadata["pruned"][str(i)] for i in range(3)] == [[], [0, 1, 2], []]
    assert isinstance(plan.layers[0], Keep) and plan.layers[1].novices == [0, 1, 2]
    # a layer never keeps fewer than top_k: 0.5 × 12 = 6, the skewed layer can give only 3
    plan = get_method("mone")(stats, 0.5, ranking="mse", allocation="global")
    counts = [len(plan.metadata["pruned"][str(i)]) for i in range(3)]
    assert sum(counts) == 6 and counts[1] == 3
    with pytest.raises(MoepressError, match="ratio too high.*at most 0.75"):
        get_method("mone")(stats, 0.8, ranking="mse", allocation="global")


# ---- NAEE against brute force ---------------------------------------------------------------------
def block_error(block, x, keep) -> float:
    with torch.no_grad():
        d = (block.forward(x, Prune(keep_experts=list(keep))) - block.forward(x)).double()
    return float((d * d).sum() / x.shape[0])


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "deepseek_v2"])
def test_naee_exhaustive_finds_the_true_optimum(family):
    _, blocks, result, _ = tiny_calibrated(family)
    plan = run("naee", result, blocks, ratio=0.25)
    for i, block in blocks.items():
        x = result.moe_inputs[i]
        errors = {keep: block_error(block, x, keep) for keep in itertools.combinations(range(8), 6)}
        best = min(errors, key=errors.get)
        assert plan.metadata["search"][str(i)] == "exhaustive"
        assert plan.layers[i].keep_experts == list(best)
        assert plan.metadata["reconstruction_error"][str(i)] == pytest.approx(errors[best], rel=1e-5)
        alone = [block_error(block, x, [a for a in range(8) if a != e]) for e in range(8)]
        assert plan.metadata["scores"][str(i)] == pytest.approx(alone, rel=1e-5, abs=1e-12)


def test_naee_greedy_fallback_is_backward_elimination():
    _, blocks, result, _ = tiny_calibrated("olmoe")
    plan = run("naee", result, blocks, ratio=0.375, exhaustive_limit=10)  # C(8, 5) = 56 > 10
    for i, block in blocks.items():
        active = list(range(8))
        for _ in range(3):
            x = result.moe_inputs[i]
            errs = [(block_error(block, x, [a for a in active if a != e]), e) for e in active]
            active.remove(min(errs)[1])
        assert plan.metadata["search"][str(i)] == "greedy"
        assert plan.layers[i].keep_experts == active


# ---- a trained checkpoint on real text ---------------------------------------------------------------
def test_methods_on_trained_olmoe_mini():
    from moepress.data import load_tokens
    from moepress.models.loading import load_model

    model, tok = load_model(mini_model_path("olmoe-mini"), dtype="float32")
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    layer, silent = 3, 0
    with torch.no_grad():
        blocks[layer].experts.weights(silent)[2].zero_()  # down_proj = 0: output constantly 0
    ids = load_tokens(tok, DATA / "calib.txt", n=8, seq_len=128).input_ids
    result = calibrate(model, ids, batch_size=8, keep_moe_inputs=128)
    stats = result.stats
    assert stats[layer].count[silent] > 0 and stats[layer].output_variance[silent] == 0

    plans = {name: get_method(name)(stats, 0.25) for name in METHODS if name != "naee"}
    two = CalibrationStats(layers={i: stats[i] for i in (1, layer)}, meta=stats.meta)
    plans["naee"] = get_method("naee")(two, 0.25, blocks=blocks, moe_inputs=result.moe_inputs)
    for name, plan in plans.items():
        if name in GLOBAL_METHODS:
            gone = [64 - len(a.keep_experts) for a in plan.layers.values() if isinstance(a, Prune)]
            assert sum(gone) == 16 * len(plan.layers)  # round(0.25 × 64) per layer on average
            continue
        for i, action in plan.layers.items():
            assert 64 - len(action.keep_experts) == 16, (name, i)  # round(0.25 × 64)
    assert plans["naee"].metadata["search"] == {"1": "greedy", str(layer): "greedy"}

    mone = plans["mone"]
    assert silent in mone.layers[layer].novices and mone.metadata["scores"][str(layer)][silent] == 0.0
    assert torch.equal(mone.novices(layer)[silent], torch.zeros(256))
    assert silent not in mone.layers[layer].keep_experts

    def error(plan) -> float:
        with torch.no_grad():
            total = 0.0
            for i, block in blocks.items():
                x = result.moe_inputs[i]
                out = block.forward(x, plan.layers[i], plan.novices(i))
                total += float(((out - block.forward(x)) ** 2).sum())
        return total

    no_novices = get_method("mone")(stats, 0.25, novices=False)
    assert error(mone) < 0.5 * error(no_novices) and error(mone) < 0.1 * error(plans["random"])
