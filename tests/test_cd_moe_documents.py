"""CD-MoE's fixed weights from whole documents, as the reference computes them (duterscmy/CD-MoE
`cd-moe/get_weight/get_weight.py`: each calibration document tokenised whole, BOS first, run alone;
the router's post-top-k weights summed per expert over every routed token of every document and divided
by the routed count, `get_weight/modeling_deepseek.py` L313-345) while the searches see each document's
first `seq_len` tokens."""

from __future__ import annotations

import pytest
import torch

from moepress.data.documents import pack_documents
from moepress.data.text import load_texts
from moepress.errors import MoepressError
from moepress.methods.cd_moe import cd_moe
from moepress.methods.greedy_search import GreedySearch
from moepress.models.loading import load_model, load_tokenizer
from moepress.plan import Condense
from moepress.testing import tiny_model

from .conftest import DATA, mini_model_path
from .test_cd_moe_reference import _moe_layers, _ref_weights
from .test_cd_moe_streamed import _assert_same_plan, _checkpoint, _streamed


def _direct_weights(model, documents: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """The reference's weights written out: per document one forward of the whole model (batch 1), the
    weights the experts receive summed per expert over all documents' routed tokens, / routed count."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, torch.Tensor] = {}
    for doc in documents:
        per_doc = _ref_weights(model, doc.reshape(1, -1))  # Σ/count of this document
        routed = _routed_counts(model, doc.reshape(1, -1))
        for i, w in per_doc.items():
            sums[i] = sums.get(i, 0) + w * routed[i]
            counts[i] = counts.get(i, 0) + routed[i]
    return {i: sums[i] / counts[i].clamp(min=1) for i in sums}


def _routed_counts(model, ids) -> dict[int, torch.Tensor]:
    counts, handles = {}, []
    for i in _moe_layers(model):
        experts = model.model.layers[i].mlp.experts
        counts[i] = torch.zeros(experts.num_experts, dtype=torch.float64)

        def hook(_m, args, i=i):
            counts[i].index_add_(0, args[1].reshape(-1), torch.ones(args[1].numel(), dtype=torch.float64))

        handles.append(experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return counts


@pytest.fixture(scope="module")
def dsv2_mini_documents():
    """dsv2-mini, and 3 calibration documents: 32-token search rows, the documents whole (capped at 160)."""
    path = mini_model_path("dsv2-mini")
    model, _ = load_model(path, dtype="float32", device="cpu")
    texts = load_texts(DATA / "calib.jsonl")
    batch = pack_documents(load_tokenizer(path), texts, n=3, seq_len=32, max_position=160)
    return model, batch


def test_whole_documents_start_with_the_search_rows_and_are_capped_at_the_context_length(dsv2_mini_documents):
    _, batch = dsv2_mini_documents
    lengths = [d.numel() for d in batch.documents]
    assert len(lengths) == 3 and all(32 < n <= 160 for n in lengths)
    for row, doc in zip(batch.input_ids, batch.documents, strict=True):
        assert torch.equal(doc[:32], row)  # BOS, then the same tokens: the search row is the document's start


def test_fixed_weights_from_whole_documents_equal_the_reference_computation(dsv2_mini_documents):
    model, batch = dsv2_mini_documents
    direct = _direct_weights(model, batch.documents)
    truncated = _ref_weights(model, batch.input_ids)
    search = GreedySearch(model, batch.input_ids, documents=batch.documents, batch_size=4)
    plain = GreedySearch(model, batch.input_ids, batch_size=4)
    assert search.counts.document_layer_forwards == model.config.num_hidden_layers  # up to the last MoE layer
    for i in _moe_layers(model):
        ours = search.stats[i]
        assert ours.tokens == sum(d.numel() for d in batch.documents)
        torch.testing.assert_close(ours.mean_weight_routed_tokens, direct[i], rtol=1e-5, atol=1e-7)
        # non-vacuity: the search rows' weights (today's `weights_from="search"`) differ, and are those
        torch.testing.assert_close(plain.stats[i].mean_weight_routed_tokens, truncated[i], rtol=1e-5, atol=1e-7)
        assert float((direct[i] - truncated[i]).abs().max()) > 1e-2
        # the pooled per-token mean, not a mean of per-document means
        per_doc = [_ref_weights(model, d.reshape(1, -1))[i] for d in batch.documents]
        assert float((direct[i] - sum(per_doc) / len(per_doc)).abs().max()) > 1e-4


def test_the_plan_condenses_with_the_whole_documents_weights_and_records_where_they_came_from(dsv2_mini_documents):
    model, batch = dsv2_mini_documents
    direct = _direct_weights(model, batch.documents)
    kwargs = dict(layers=1, experts=2, expert_pool=6, batch_size=4, candidate_layers=[1, 2])
    plan = cd_moe(model, batch.input_ids, documents=batch.documents, **kwargs)
    assert plan.hyperparameters["weights_from"] == "documents"
    meta = plan.metadata["weight_documents"]
    assert meta["documents"] == 3 and meta["tokens"] == sum(d.numel() for d in batch.documents)
    assert plan.metadata["forward_passes"]["document_layer_forwards"] == 3  # layers 0-2
    for i, action in plan.layers.items():
        assert isinstance(action, Condense)
        assert action.weights == pytest.approx([float(direct[i][e]) for e in action.experts], rel=1e-5)
        pool = plan.metadata["experts"][str(i)]["pool"]
        assert pool == 6  # the pool ranks by the whole documents' weights too
    old = cd_moe(model, batch.input_ids, documents=batch.documents, weights_from="search", **kwargs)
    assert old.hyperparameters["weights_from"] == "search" and "weight_documents" not in old.metadata
    plain = cd_moe(model, batch.input_ids, **kwargs)  # no whole documents: the search rows are all there is
    assert plain.hyperparameters["weights_from"] == "search"
    assert old.layers == plain.layers and old.metadata["experts"] == plain.metadata["experts"]
    assert {i: a.weights for i, a in plan.layers.items()} != {i: a.weights for i, a in old.layers.items()}


def test_methods_without_routed_experts_take_no_weight_pass():
    model = tiny_model("deepseek_v2", seed=1, num_hidden_layers=3)
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    plan = cd_moe(model, ids, layers=1, experts=0, documents=list(ids))
    assert (
        "weights_from" not in plan.hyperparameters and "document_layer_forwards" not in plan.metadata["forward_passes"]
    )


def test_bad_weight_arguments_are_user_errors():
    model = tiny_model("deepseek_v2", seed=1, num_hidden_layers=3)
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MoepressError, match="weights_from"):
        cd_moe(model, ids, layers=1, weights_from="tokens")
    with pytest.raises(MoepressError, match="documents"):
        cd_moe(model, ids, layers=1, documents=[ids])  # 2-D


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe"])
def test_streamed_search_takes_the_same_whole_document_weights(tmp_path, family):
    model = _checkpoint(tmp_path, family)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    documents = [
        torch.cat([row, torch.randint(3, 128, (n,), generator=g)]) for row, n in zip(ids, (5, 30, 0, 17), strict=True)
    ]
    kwargs = dict(layers=2, experts=2, batch_size=4, documents=documents)
    memory = cd_moe(model, ids, **kwargs)
    streamed = _streamed(tmp_path, ids, **kwargs)
    _assert_same_plan(memory, streamed)
    assert memory.hyperparameters["weights_from"] == streamed.hyperparameters["weights_from"] == "documents"
    assert memory.metadata["weight_documents"] == streamed.metadata["weight_documents"]
    assert memory.layers != cd_moe(model, ids, **{**kwargs, "weights_from": "search"}).layers
