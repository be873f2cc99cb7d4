"""The CD-MoE search with decoder layers streamed from the checkpoint gives the in-memory search's plan,
reads each layer as often as its formula says and leaves no layer on the device."""

from __future__ import annotations

import pytest
import torch

from moepress.calibrate.streaming import Streamer
from moepress.errors import MoepressError
from moepress.methods.cd_moe import cd_moe
from moepress.methods.streamed_search import streamed_layer_loads
from moepress.models.loading import load_model
from moepress.testing import tiny_model

from .conftest import DATA, mini_model_path


def _checkpoint(tmp_path, family: str, layers: int = 4):
    extra = {"layer_types": ["full_attention"] * layers} if family.startswith("qwen") else {}
    model = tiny_model(family, num_hidden_layers=layers, **extra)
    model.save_pretrained(tmp_path)
    return model


def _ids(n: int = 6, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 128, (n, length), generator=torch.Generator().manual_seed(0))


def _streamed(folder, ids, **kwargs):
    stream = Streamer(folder, "cpu", torch.float32)
    try:
        plan = cd_moe(stream.model, ids, stream=stream, **kwargs)
        on_device = [n for n, p in stream.model.named_parameters() if ".layers." in n and not p.is_meta]
    finally:
        stream.close()
    assert on_device == []  # every layer went back to disk
    return plan


def _assert_same_plan(a, b) -> None:
    assert a.layers.keys() == b.layers.keys()
    assert a.metadata["order"] == b.metadata["order"]
    for m, action in a.layers.items():
        other = b.layers[m]
        assert action.action == other.action
        if action.action == "condense":
            assert action.experts == other.experts
            assert action.weights == pytest.approx(other.weights, rel=1e-6)
    assert a.metadata["curve"] == pytest.approx(b.metadata["curve"], rel=1e-6)
    assert a.metadata["experts"] == b.metadata["experts"]
    assert a.model_fingerprint == b.model_fingerprint and a.data_fingerprint == b.data_fingerprint
    fa, fb = a.metadata["forward_passes"], b.metadata["forward_passes"]
    assert fa["search_layer_forwards"] == fb["search_layer_forwards"]
    assert fa["metric_evals"] == fb["metric_evals"]


@pytest.mark.parametrize("family", ["deepseek_v2", "qwen2_moe", "mixtral"])
def test_streamed_cd_moe_sr_equals_in_memory(tmp_path, family):
    model = _checkpoint(tmp_path, family)
    ids = _ids()
    memory = cd_moe(model, ids, layers=3, experts=2, batch_size=4)
    streamed = _streamed(tmp_path, ids, layers=3, experts=2, batch_size=4)
    _assert_same_plan(memory, streamed)
    passes = streamed.metadata["forward_passes"]
    steps = [([int(k) for k in c], m) for c, m in zip(streamed.metadata["candidates"], streamed.metadata["order"],
                                                      strict=True)]
    assert passes["layer_loads"] == streamed_layer_loads(4, steps)
    # one read for the original pass, every expert search and layer step 1; then at most one a step
    assert passes["layer_loads"] <= 4 * 3


@pytest.mark.parametrize(("family", "kwargs"), [
    ("flex_olmo", {"layers": 2, "experts": 2}),  # a post-MLP norm: its layers run whole per candidate
    ("qwen4_exp", {"layers": 2, "experts": 1}),  # hyper-connections: several residual streams
    ("afmoe", {"layers": 2, "drop": True, "metric": "vocab-js"}),
])
def test_streamed_equals_in_memory_on_layers_not_of_the_residual_form(tmp_path, family, kwargs):
    model = tiny_model(family)  # the family's own tiny layer types
    model.save_pretrained(tmp_path)
    ids = _ids()
    memory = cd_moe(model, ids, batch_size=4, **kwargs)
    assert memory.metadata["forward_passes"]["whole_layers"]
    streamed = _streamed(tmp_path, ids, batch_size=4, **kwargs)
    _assert_same_plan(memory, streamed)
    assert streamed.metadata["forward_passes"]["whole_layers"] == memory.metadata["forward_passes"]["whole_layers"]


@pytest.mark.parametrize("kwargs", [
    {"experts": 0, "memory_budget": 0.9},
    {"drop": True, "layers": 2, "metric": "vocab-js"},
    {"experts": 1, "layers": 2, "candidate_layers": [2, 3], "weight_mode": "all"},
])
def test_streamed_variants_equal_in_memory(tmp_path, kwargs):
    model = _checkpoint(tmp_path, "deepseek_v2")
    ids = _ids()
    _assert_same_plan(cd_moe(model, ids, batch_size=4, **kwargs), _streamed(tmp_path, ids, batch_size=4, **kwargs))


def test_streamed_expert_search_takes_only_the_local_metric(tmp_path):
    _checkpoint(tmp_path, "deepseek_v2")
    with pytest.raises(MoepressError, match="streamed search scores expert candidates"):
        _streamed(tmp_path, _ids(), layers=1, experts=2, metric="vocab-js")


def test_streamed_layer_loads_formula():
    # 5 layers; step 2 re-runs from layer 1 (a candidate), step 3 from layer 1 (the layer chosen last)
    assert streamed_layer_loads(5, [([1, 2, 3], 2), ([1, 3], 1), ([3], 3)]) == 5 + 4 + 4
    assert streamed_layer_loads(5, [([1, 2, 3], 2)]) == 5


def test_plan_for_stream_equals_in_memory(tmp_path):
    from moepress.compression import plan_for
    from moepress.pipeline import write_demo_model

    folder = write_demo_model(tmp_path / "demo")
    args = dict(data=str(DATA / "calib.txt"), layers=1, experts=1, n=4, seq_len=32, device="cpu")
    memory = plan_for(folder, "cd-moe-sr", **args)
    streamed = plan_for(folder, "cd-moe-sr", stream=True, **args)
    _assert_same_plan(memory, streamed)


def test_streamed_equals_in_memory_on_dsv2_mini():
    path = mini_model_path("dsv2-mini")
    model, _ = load_model(path, dtype="float32", device="cpu")
    ids = _ids(n=4, length=32)
    kwargs = dict(layers=2, experts=2, expert_pool=8, batch_size=4)
    _assert_same_plan(cd_moe(model, ids, **kwargs), _streamed(path, ids, **kwargs))
