"""MoNE as its reference code computes it (github.com/zxgx/mode-pd, `modepd/pruning/expert_prune.py`):
`mone`, the paper's ablations and the RS baseline pinned against a naive re-implementation written
here from forward hooks on the model's own router and experts (nothing from moepress's statistics
code), plus allocation properties."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moepress.calibrate import CalibrationStats, LayerStats, calibrate
from moepress.errors import MoepressError
from moepress.methods import get_method
from moepress.methods.base import round_half_up
from moepress.methods.rs import choose_global_threshold
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

FAMILIES = ("deepseek_v2", "olmoe")  # the reference code's two transformers families
RATIO = 0.25  # 2 of 8 experts per layer; the reference's preserve_n_experts = 6


def moe_layers(model) -> dict[int, torch.nn.Module]:
    return {i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")}


def naive_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's unweighted output, from the fused weights as the model's forward computes it."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@torch.no_grad()
def reference_stats(model, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """Per MoE layer: routing score (post-top-k gate weight summed over all tokens / tokens, EP
    L507-542), per-dimension variance and mean of each expert's unweighted output over its routed
    tokens (EP L457-503; exact population variance, float64), from whole-model forwards."""
    acc: dict[int, dict] = {}
    handles = []
    for i, mlp in moe_layers(model).items():
        n = mlp.experts.gate_up_proj.shape[0]
        acc[i] = {"weights": torch.zeros(n, dtype=torch.float64), "tokens": 0, "outs": [[] for _ in range(n)]}

        def gate_hook(_m, _args, out, a=acc[i], n=n):
            _, weights, index = out
            dense = torch.zeros(index.shape[0], n, dtype=torch.float64)
            a["weights"] += dense.scatter(1, index, weights.double()).sum(0)
            a["tokens"] += index.shape[0]

        def experts_hook(m, args, a=acc[i]):
            x, index, _ = args
            for e in range(len(a["outs"])):
                tokens = (index == e).any(-1)
                a["outs"][e].append(naive_expert(m, e, x[tokens]).double())

        handles += [mlp.gate.register_forward_hook(gate_hook), mlp.experts.register_forward_pre_hook(experts_hook)]
    try:
        for start in range(0, ids.shape[0], 2):
            model(ids[start : start + 2])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, a in acc.items():
        ys = [torch.cat(o) for o in a["outs"]]
        assert all(len(y) > 1 for y in ys), "every expert routed: no ties at 0 in these tests"
        out[i] = {
            "routing": a["weights"] / a["tokens"],
            "var": torch.stack([y.var(0, unbiased=False) for y in ys]),
            "mean": torch.stack([y.mean(0) for y in ys]),
        }
    return out


@functools.cache
def setup(family: str):
    model = tiny_model(family, seed=3)
    ids = torch.randint(3, 128, (6, 32), generator=torch.Generator().manual_seed(11))
    stats = calibrate(model, ids, batch_size=2).stats
    return model, ids, stats, reference_stats(model, ids)


def reference_layer_prune(metric: torch.Tensor, preserve_n: int) -> list[int]:
    """EP L633-645: keep metric > sorted_desc[preserve_n]; the rest become novices."""
    threshold = torch.sort(metric, descending=True).values[preserve_n]
    return [e for e, keep in enumerate((metric > threshold).tolist()) if not keep]


REFERENCE_METRICS = {
    # EP L602-607 with fusion_io_weight 0.5: (a·‖sqrt(var)‖₂)·((1−a)·routing score)
    "mone": lambda r: (0.5 * r["var"].sum(-1).sqrt()) * (0.5 * r["routing"]),
    "mone-zero-novice": lambda r: (0.5 * r["var"].sum(-1).sqrt()) * (0.5 * r["routing"]),
    "mone-variance": lambda r: torch.norm(r["var"], dim=1),  # EP L597-601
    "mone-frequency": lambda r: r["routing"],  # EP L594-596
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(REFERENCE_METRICS))
def test_ranking_and_pruned_set_match_the_reference(family, method):
    _, _, stats, ref = setup(family)
    plan = get_method(method)(stats, RATIO)
    assert plan.hyperparameters["frequency_metric"] == "weight"
    for i, r in ref.items():
        metric = REFERENCE_METRICS[method](r)
        pruned = reference_layer_prune(metric, 8 - 2)
        assert len(pruned) == 2
        assert plan.metadata["pruned"][str(i)] == pruned
        assert plan.layers[i].novices == pruned and len(plan.layers[i].keep_experts) == 6
        torch.testing.assert_close(torch.tensor(plan.metadata["scores"][str(i)], dtype=torch.float64), metric,
                                   rtol=1e-5, atol=0)
        vectors = plan.novices(i)
        for e in pruned:
            expected = torch.zeros(r["mean"].shape[1]) if method == "mone-zero-novice" else r["mean"][e].float()
            torch.testing.assert_close(vectors[e], expected, rtol=1e-5, atol=1e-7)


def test_default_mone_is_the_reference_and_mse_is_the_old_variant():
    _, _, stats, _ = setup("olmoe")
    default = get_method("mone")(stats, RATIO)
    assert default.hyperparameters == {
        "ratio": RATIO, "seed": 0, "ranking": "fusion", "fusion_weight": 0.5, "allocation": "uniform",
        "novices": True, "frequency_metric": "weight",
    }
    assert default.metadata["novice_vectors"] == "mean output"
    # the same reference ranking at another fusion weight: a only scales the product
    scaled = get_method("mone")(stats, RATIO, fusion_weight=0.3)
    assert scaled.metadata["pruned"] == default.metadata["pruned"]
    mse = get_method("mone")(stats, RATIO, ranking="mse")
    assert mse.hyperparameters["frequency_metric"] == "count"
    for i, s in stats.layers.items():
        f, v = s.frequency.double(), s.output_variance.double()
        expected = (f / f.max()).sqrt() * (v / v.max()).sqrt()
        assert mse.metadata["scores"][str(i)] == pytest.approx(expected.tolist(), rel=1e-12)
    with pytest.raises(MoepressError, match="fusion_weight=1 zeroes every score under ranking=fusion"):
        get_method("mone")(stats, RATIO, fusion_weight=1)
    with pytest.raises(MoepressError, match="ranking must be one of"):
        get_method("mone")(stats, RATIO, ranking="trace")
    with pytest.raises(MoepressError, match="novices must be true, false or zero"):
        get_method("mone")(stats, RATIO, novices="none")


def run_with_hooks(model, ids, pruned: dict[int, list[int]], novices: dict[int, torch.Tensor] | None):
    """The original model with the pruned experts' outputs replaced (routing and weights unchanged):
    by 0, or by w · novices[layer][expert]."""
    handles, saved = [], {}
    for i, mlp in moe_layers(model).items():
        gone = torch.tensor(pruned[i])

        def pre(_m, args, i=i, gone=gone):
            x, index, weights = args
            hit = torch.isin(index, gone)
            saved[i] = (index, weights * hit)
            return x, index, weights * ~hit

        def post(_m, _args, out, i=i):
            if novices is None:
                return out
            index, w = saved[i]
            return out + (w[..., None] * novices[i][index]).sum(1).to(out.dtype)

        handles += [mlp.experts.register_forward_pre_hook(pre), mlp.experts.register_forward_hook(post)]
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["mone-zero-novice", "mone"])
def test_applied_model_equals_the_original_with_pruned_outputs_replaced(method):
    model, ids, stats, ref = setup("deepseek_v2")
    plan = get_method(method)(stats, RATIO)
    pruned = {i: plan.metadata["pruned"][str(i)] for i in ref}
    novices = None if method == "mone-zero-novice" else {i: r["mean"].float() for i, r in ref.items()}
    expected = run_with_hooks(model, ids, pruned, novices)
    with torch.no_grad():
        original = model(ids).logits
        got = apply_plan(copy.deepcopy(model), plan)(ids).logits
    assert (expected - original).abs().max() > 1e-3  # the pruned experts mattered
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def reference_rs_global(ref, preserve_n: int, num_experts: int) -> dict[int, list[int]]:
    """EP L115-127: one threshold over the concatenated scores of all layers, ≥ 1 expert per layer."""
    scores = {i: r["routing"] for i, r in ref.items()}
    metric = torch.cat(list(scores.values()))
    sorted_scores = torch.sort(metric, descending=True).values
    threshold = sorted_scores[math.ceil(len(metric) * preserve_n / num_experts)]
    pruned = {}
    for i, s in scores.items():
        keep = torch.where(s > threshold)[0].tolist()
        if not keep:
            keep.append(int(torch.argmax(s)))
        pruned[i] = [e for e in range(num_experts) if e not in keep]
    return pruned


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_rs_matches_the_reference_global_threshold(family, ratio):
    model, _, stats, ref = setup(family)
    plan = get_method("rs")(stats, ratio)
    expected = reference_rs_global(ref, 8 - round_half_up(ratio * 8), 8)
    assert all(8 - len(p) >= 2 for p in expected.values())  # top_k = 2: the floors agree here
    assert {int(i): p for i, p in plan.metadata["pruned"].items()} == expected
    for i, r in ref.items():
        torch.testing.assert_close(torch.tensor(plan.metadata["scores"][str(i)], dtype=torch.float64),
                                   r["routing"], rtol=1e-5, atol=0)
        assert plan.layers[i].novices == []  # removed from the router too
    plan.validate_for(model)


def test_rs_tops_a_starved_layer_up_to_top_k():
    # layer 1's experts all score below every expert of layers 0 and 2
    stats = weight_stats([[0.5, 0.4, 0.3, 0.2], [0.01, 0.02, 0.03, 0.04], [0.6, 0.55, 0.45, 0.35]], top_k=2)
    plan = get_method("rs")(stats, 0.5)  # the best 3 × 2 = 6: all of layer 2, two of layer 0 ...
    assert plan.metadata["pruned"] == {"0": [2, 3], "1": [0, 1], "2": []}  # ... and layer 1's best two
    assert [plan.action(i).action for i in range(3)] == ["prune", "prune", "keep"]


def weight_stats(scores: list[list[float]], top_k: int, tokens: int = 1000) -> CalibrationStats:
    """Statistics whose mean gate weights are `scores` (and, for mone, routed-token counts and
    variances derived from them, so every ranking is well defined)."""
    layers = {}
    for i, row in enumerate(scores):
        s = LayerStats(i, len(row), 3, top_k, tokens=tokens)
        w = torch.tensor(row, dtype=torch.float64)
        s.weight_sum = w * tokens
        s.count = torch.full_like(w, 10.0)
        s.out_m2 = (torch.arange(1, 4, dtype=torch.float64) * w[:, None].flip(0)) * 10
        layers[i] = s
    return CalibrationStats(layers=layers)


@st.composite
def layered_scores(draw):
    n_layers = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, 4))
    experts = draw(st.integers(top_k + 1, 24))
    ids = draw(st.permutations(range(n_layers * experts)))  # distinct scores
    scores = [[(ids[i * experts + e] + 1) / (n_layers * experts) for e in range(experts)] for i in range(n_layers)]
    return scores, top_k, draw(st.floats(0.01, 0.99))


@settings(max_examples=60, deadline=None)
@given(layered_scores())
def test_allocation_properties(case):
    scores, top_k, ratio = case
    experts = len(scores[0])
    n = round_half_up(ratio * experts)
    stats = weight_stats(scores, top_k)
    if n == 0 or experts - n < top_k:
        with pytest.raises(MoepressError, match="ratio too"):
            get_method("rs")(stats, ratio)
        return
    # uniform: exactly round(ratio × E) per layer, for the reference ranking and every ablation
    for name in ("mone", "mone-zero-novice", "mone-variance", "mone-frequency"):
        plan = get_method(name)(stats, ratio)
        assert all(len(p) == n for p in plan.metadata["pruned"].values()), name
    assert all(len(p) == n for p in get_method("rs")(stats, ratio, allocation="uniform").metadata["pruned"].values())
    fusion = get_method("mone")(stats, ratio, allocation="global")  # the reference's model scope, as RS
    metric = {int(i): v for i, v in fusion.metadata["scores"].items()}
    assert {int(i): p for i, p in fusion.metadata["pruned"].items()} == choose_global_threshold(stats, ratio, metric)
    # global RS: the global top K = L × (E − n) are kept, a layer with fewer than top_k of them is
    # topped up to exactly top_k by its own best, nothing else is kept
    kept = {int(i): set(range(experts)) - set(p) for i, p in get_method("rs")(stats, ratio).metadata["pruned"].items()}
    flat = sorted(((s, i, e) for i, row in enumerate(scores) for e, s in enumerate(row)), reverse=True)
    top = {(i, e) for _, i, e in flat[: len(scores) * (experts - n)]}
    floor = max(1, top_k)
    extra = 0
    for i, row in enumerate(scores):
        mine = {e for (j, e) in top if j == i}
        assert kept[i] >= mine and len(kept[i]) >= floor
        if len(mine) < floor:
            assert len(kept[i]) == floor and kept[i] == set(sorted(range(experts), key=row.__getitem__)[-floor:])
            extra += floor - len(mine)
        else:
            assert kept[i] == mine
    assert sum(len(k) for k in kept.values()) == len(scores) * (experts - n) + extra


def reference_running_variance(batches: list[torch.Tensor]) -> torch.Tensor:
    """The reference's running per-dimension output variance of one expert (EP L475-480, `fusion`):
    the first batch's deviations are never added, and each later batch's deviations are taken from
    the running mean already updated with that batch."""
    n, mean, var = 0, torch.zeros(batches[0].shape[-1], dtype=torch.float64), None
    for out in batches:
        m = out.shape[0]
        mean = mean * (n / (n + m)) + out.sum(0) / (n + m)
        if n > 0:
            var = var * ((n - 1) / (n + m - 1)) + (out - mean).pow(2).sum(0) / (n + m)
        else:
            var = torch.zeros_like(mean)
        n += m
    return var


def test_reference_running_variance_differs_as_docs_methods_says():
    """docs/methods.md and mone.py: 2 tokens in 2 batches give (y2−y1)²/8 where the population variance
    (moepress's, `LayerStats.out_m2 / count`) is (y2−y1)²/4; one batch gives 0."""
    y1, y2 = torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor([[3.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(reference_running_variance([y1, y2]), (y2 - y1)[0] ** 2 / 8)
    torch.testing.assert_close(reference_running_variance([torch.cat([y1, y2])]), torch.zeros(2, dtype=torch.float64))
    stats = LayerStats(0, num_experts=1, hidden_size=2, top_k=1)
    for y in (y1, y2):
        stats.add_expert(0, y, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(stats.out_m2[0] / stats.count[0], (y2 - y1)[0] ** 2 / 4)
