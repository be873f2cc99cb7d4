"""CD-MoE's defaults are its reference code's computation (github duterscmy/CD-MoE): pinned against a
direct re-implementation of the reference scripts written here from the model's own modules — fixed
weights from the router's top-k over routed tokens (`get_weight.py`), JS over a softmax across the
hidden dimension with `F.kl_div(..., reduction='batchmean')` per document (`greedy_search_expert.py`
L20-51), the expert search at the condensed layer's own output and the layer search at the final
normed hidden state (`greedy_search_layer.py`), every candidate a whole-model forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepress.data.documents import pack_documents, paragraph_documents
from moepress.errors import MoepressError
from moepress.methods.cd_moe import cd_moe
from moepress.methods.scoring import hidden_js
from moepress.plan import Condense
from moepress.testing import tiny_model


# ---- the reference, re-implemented ------------------------------------------------------------------
def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    eps = 1e-10
    return F.kl_div((q + eps).log(), p + eps, reduction="batchmean")


def _ref_js(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    p, q = F.softmax(logits_p, dim=-1), F.softmax(logits_q, dim=-1)
    m = 0.5 * (p + q)
    return 0.5 * (_ref_kl(p, m) + _ref_kl(q, m))


def _ref_mean_js(original: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over documents of each document's token-mean JS (`get_total_js_divergence`)."""
    return sum(_ref_js(o, c).item() for o, c in zip(original.float(), candidate.float(), strict=True)) / len(original)


def _moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def _ref_weights(model, ids) -> dict[int, torch.Tensor]:
    """Σ top-k weight / routed count per expert, read off the experts' inputs in a whole-model forward."""
    sums, counts, handles = {}, {}, []
    for i in _moe_layers(model):
        experts = model.model.layers[i].mlp.experts
        sums[i] = torch.zeros(experts.num_experts, dtype=torch.float64)
        counts[i] = torch.zeros(experts.num_experts, dtype=torch.float64)

        def hook(_m, args, i=i):
            _, index, weights = args[:3]
            sums[i].index_add_(0, index.reshape(-1), weights.reshape(-1).double())
            counts[i].index_add_(0, index.reshape(-1), torch.ones(index.numel(), dtype=torch.float64))

        handles.append(experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {i: sums[i] / counts[i].clamp(min=1) for i in sums}


def _hidden_states(model, ids, condensed: dict[int, tuple[list[int], torch.Tensor]]):
    """All hidden states with layers condensed the reference's way: y = shared(x) + Σ_e w_e·E_e(x)."""
    handles = []
    for i, (experts, weights) in condensed.items():
        mlp = model.model.layers[i].mlp

        def replace(m, args, _out, experts=experts, weights=weights):
            x = args[0]
            flat = x.reshape(-1, x.shape[-1])
            index = torch.tensor(experts, dtype=torch.long).expand(flat.shape[0], -1)
            w = torch.tensor([float(weights[e]) for e in experts], dtype=flat.dtype).expand(flat.shape[0], -1)
            y = m.experts(flat, index, w).reshape(x.shape) if experts else torch.zeros_like(x)
            return y + m.shared_experts(x)

        handles.append(mlp.register_forward_hook(replace))
    try:
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in handles:
            h.remove()


def _reference_cd_moe(model, ids, k: int, n_layers: int):
    weights = _ref_weights(model, ids)
    original = _hidden_states(model, ids, {})
    orders, expert_curves = {}, {}
    for i in _moe_layers(model):
        pool = [e for e in range(len(weights[i])) if weights[i][e] > 0]
        order, curve = [], []
        for _ in range(k):
            scores = [
                (_ref_mean_js(original[i + 1], _hidden_states(model, ids, {i: (order + [e], weights[i])})[i + 1]), e)
                for e in pool
                if e not in order
            ]
            value, e = min(scores)
            order.append(e)
            curve.append(value)
        orders[i], expert_curves[i] = order, curve
    chosen: list[int] = []
    layer_curve = []
    for _ in range(n_layers):
        scores = []
        for m in _moe_layers(model):
            if m in chosen:
                continue
            condensed = {c: (orders[c], weights[c]) for c in chosen + [m]}
            scores.append((_ref_mean_js(original[-1], _hidden_states(model, ids, condensed)[-1]), m))
        value, m = min(scores)
        chosen.append(m)
        layer_curve.append(value)
    return weights, orders, expert_curves, chosen, layer_curve


# ---- tests -------------------------------------------------------------------------------------------
def test_hidden_js_is_the_reference_formula():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, 32, generator=g) * 3, torch.randn(5, 7, 32, generator=g) * 3
    ours = hidden_js(a, b).mean(-1)
    for d in range(5):
        assert float(ours[d]) == pytest.approx(float(_ref_js(a[d], b[d])), rel=1e-5, abs=1e-9)
    assert float(hidden_js(a, a).abs().max()) < 1e-6


def test_default_cd_moe_sr_equals_the_reference_scripts():
    model = tiny_model("deepseek_v2", seed=3, num_hidden_layers=4)
    ids = torch.randint(3, 128, (6, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 0  # BOS
    top_k = model.config.num_experts_per_tok
    plan = cd_moe(model, ids, layers=3, batch_size=4)  # defaults: k = top-k, routed weights, hidden JS
    weights, orders, expert_curves, chosen, curve = _reference_cd_moe(model, ids, top_k, 3)
    assert plan.hyperparameters["experts"] == top_k
    assert plan.hyperparameters["metric"] == "hidden-js" and plan.hyperparameters["weight_mode"] == "routed"
    assert plan.metadata["order"] == chosen
    assert plan.metadata["curve"] == pytest.approx(curve, rel=1e-4, abs=1e-9)
    for i in _moe_layers(model):
        meta = plan.metadata["experts"][str(i)]
        assert meta["order"] == orders[i]
        assert meta["curve"] == pytest.approx(expert_curves[i], rel=1e-4, abs=1e-9)
    for i, action in plan.layers.items():
        assert isinstance(action, Condense) and action.experts == orders[i]
        assert action.weights == pytest.approx([float(weights[i][e]) for e in orders[i]], rel=1e-6)
    # the reference's weights are means over routed tokens: Σ over the top-k of a token is ~ its mass
    assert all(float(w.max()) > 1.0 / model.config.n_routed_experts for w in weights.values())


def test_expert_search_on_the_last_decoder_layer_scores_the_final_normed_state():
    """hidden_states[-1] is after the final norm; the reference scores the last MoE layer there."""
    model = tiny_model("deepseek_v2", seed=5, num_hidden_layers=3)
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(2))
    plan = cd_moe(model, ids, layers=1, experts=1, batch_size=4, candidate_layers=[2])
    weights = _ref_weights(model, ids)
    original = _hidden_states(model, ids, {})
    values = {
        e: _ref_mean_js(original[-1], _hidden_states(model, ids, {2: ([e], weights[2])})[-1])
        for e in range(len(weights[2]))
        if weights[2][e] > 0
    }
    best = min(values, key=lambda e: (values[e], e))
    assert plan.metadata["experts"]["2"]["order"] == [best]
    assert plan.metadata["experts"]["2"]["curve"][0] == pytest.approx(values[best], rel=1e-4, abs=1e-9)


def test_no_layer_forwards_after_the_layer_in_the_reference_expert_search():
    model = tiny_model("deepseek_v2", seed=0, num_hidden_layers=4)
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    plan = cd_moe(model, ids, layers=1, experts=2, batch_size=4)
    fp = plan.metadata["forward_passes"]
    n_moe = 3  # layer 0 dense
    # caching pass (4) + the layer step's candidates (3 + 2 + 1 layers after each MoE layer)
    assert fp["search_layer_forwards"] == 4 + (2 + 1 + 0)
    assert fp["naive_layer_forwards"] > fp["search_layer_forwards"]
    assert fp["metric_evals"] == 1 + n_moe * (8 + 7) + n_moe


class _Tok:
    """A character tokenizer with a BOS id, enough to pin how documents are cut."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 50) for c in text]}


def test_documents_start_with_bos_are_truncated_and_skip_short_ones():
    texts = ["a" * 30, "short", "b" * 12, "c" * 40]
    batch = pack_documents(_Tok(), texts, n=3, seq_len=10)
    assert batch.input_ids.shape == (3, 10)
    assert (batch.input_ids[:, 0] == 1).all()
    firsts = {int(r[1]) for r in batch.input_ids}
    assert firsts == {3 + ord("a") % 50, 3 + ord("b") % 50, 3 + ord("c") % 50}
    assert batch.skipped_documents == 1
    with pytest.raises(MoepressError, match="too few"):
        pack_documents(_Tok(), texts, n=4, seq_len=10)


def test_txt_documents_are_runs_of_whole_paragraphs():
    docs = paragraph_documents(["p1 aaaa\n\np2 bbbb\n\np3 cccc\n\n", "p4 dddd"], min_chars=12)
    assert docs == ["p1 aaaa\n\np2 bbbb", "p3 cccc\n\np4 dddd"]
