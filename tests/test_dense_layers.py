"""Condensed and dropped MoE layers as the family's own dense MLP (Qwen's `mlp_only_layers`): the output
is then a plain checkpoint of the source architecture that reproduces the compressed model exactly;
layers that do not fit (a per-token-gated shared expert, wider than `intermediate_size`) keep
moepress's own modules, as does `dense_layers="never"`."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import moepress
from moepress.errors import MoepressError
from moepress.finetune.trainable import condensed_modules
from moepress.io import predict_size, save_compressed
from moepress.io.manifest import MANIFEST_FILE
from moepress.io.stream_save import save_compressed_streaming
from moepress.models import get_adapter
from moepress.models.loading import load_model
from moepress.modules import CondensedMLP
from moepress.modules.compressed import DroppedMLP
from moepress.plan import CompressionPlan, Condense, Drop, Prune
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

from .conftest import DATA, mini_model_path

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model: torch.nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _written_bytes(folder: Path) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(folder).values())


def _assert_plain(out: Path, model_type: str, dense: list[int], want: torch.Tensor, ids: torch.Tensor = IDS):
    """A plain folder of `model_type` listing `dense`, which plain transformers and moepress.load both
    load to `want`'s logits."""
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type
    assert sorted(config["mlp_only_layers"]) == dense
    assert "moepress_structure" not in config and "auto_map" not in config
    assert not (out / "modeling_moepress.py").exists()
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["plain_architecture"] and manifest["dense_layers"]["config_field"] == "mlp_only_layers"
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no custom code
    assert type(plain).__module__.startswith("transformers.models.")
    torch.testing.assert_close(_logits(plain, ids), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(moepress.load(out, dtype=torch.float32), ids), want, rtol=0, atol=1e-6)


def _sr_plan(moe: list[int]) -> CompressionPlan:
    """What CD-MoE-SR gives on a Qwen3-MoE (no shared expert): k routed experts at fixed weights."""
    return CompressionPlan(
        method="cd-moe-sr",
        layers={
            moe[0]: Condense(experts=[2, 5, 6], weights=[0.5, 0.3, 0.2]),
            moe[-1]: Condense(experts=[1], weights=[0.7]),
        },
    )


def test_cd_moe_sr_on_qwen3_moe_is_a_plain_checkpoint(tmp_path):
    model = tiny_model("qwen3_moe")  # mlp_only_layers=[0], intermediate_size 64, experts of 16 rows
    moe = get_adapter(model).moe_layer_ids(model)
    plan = _sr_plan(moe)
    reference = apply_plan(copy.deepcopy(model), plan, dense_layers="never")  # CondensedMLP
    predicted = predict_size(model, plan)
    compressed = apply_plan(model, plan)
    layers = get_adapter(compressed, require_moe=False).layers(compressed)
    assert all(type(layers[i].mlp).__name__ == "Qwen3MoeMLP" for i in moe)
    assert all(layers[i].mlp.up_proj.weight.shape == (64, 32) for i in moe)
    assert compressed.config.mlp_only_layers == [0, *moe]
    assert condensed_modules(compressed, plan) == {i: layers[i].mlp for i in moe}  # what fine-tuning trains
    want = _logits(compressed)
    torch.testing.assert_close(want, _logits(reference), rtol=0, atol=1e-6)  # the same model as CondensedMLP's

    out = save_compressed(compressed, plan, tmp_path / "out")
    _assert_plain(out, "qwen3_moe", [0, *moe], want)
    assert _written_bytes(out) == predicted.bytes
    dense = json.loads((out / MANIFEST_FILE).read_text())["dense_layers"]
    assert dense["layers"] == moe and dense["width"] == 64
    assert dense["zero_bytes"] == ((64 - 48) + (64 - 16)) * 3 * 32 * 4  # float32 zero rows


def test_cd_moe_sr_on_qwen3_moe_streams_to_the_same_folder(tmp_path):
    source = tmp_path / "src"
    tiny_model("qwen3_moe").save_pretrained(source)
    model, _ = load_model(source, dtype="float32")
    plan = _sr_plan(get_adapter(model).moe_layer_ids(model))
    mem = save_compressed(apply_plan(model, plan), plan, tmp_path / "mem", source=source)
    streamed = save_compressed_streaming(source, plan, tmp_path / "stream", dtype=torch.float32)
    _assert_same_folder(mem, streamed)


def _assert_same_folder(mem: Path, streamed: Path) -> None:
    a, b = _tensors(mem), _tensors(streamed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (mem, streamed))
    for key in ("model_type", "architectures", "mlp_only_layers", "num_experts", "num_local_experts"):
        assert config_a.get(key) == config_b.get(key), key
    assert "moepress_structure" not in config_b
    manifest_a, manifest_b = (json.loads((f / MANIFEST_FILE).read_text()) for f in (mem, streamed))
    assert manifest_a["dense_layers"] == manifest_b["dense_layers"] is not None
    assert manifest_a["bytes_after"] == manifest_b["bytes_after"]


@pytest.fixture(scope="module")
def layer_drop_outputs(tmp_path_factory):
    """layer-drop (2 layers) on qwen2moe-mini, written in memory and streamed."""
    src = mini_model_path("qwen2moe-mini")
    tmp = tmp_path_factory.mktemp("layer_drop")
    kwargs = dict(data=DATA / "calib.txt", layers=2, n=8, seq_len=128, device="cpu")
    mem = moepress.compress(src, "layer-drop", tmp / "mem", **kwargs)
    streamed = moepress.compress(src, "layer-drop", tmp / "stream", stream=True, **kwargs)
    return src, mem, streamed


def test_layer_drop_on_qwen2moe_mini_is_a_plain_checkpoint(layer_drop_outputs):
    src, out, _ = layer_drop_outputs
    plan = CompressionPlan.load(out / "moepress_plan.json")
    dropped = sorted(i for i, a in plan.layers.items() if isinstance(a, Drop))
    assert len(dropped) == 2 and all(isinstance(a, Drop) for a in plan.layers.values())
    model, _ = load_model(src, dtype="float32")
    compressed = apply_plan(model, plan)
    assert compressed.config.mlp_only_layers == dropped
    layers = get_adapter(compressed, require_moe=False).layers(compressed)
    for i in dropped:  # intermediate_size rows of zeros: output exactly 0
        assert type(layers[i].mlp).__name__ == "Qwen2MoeMLP"
        assert all(not p.any() for p in layers[i].mlp.parameters())
    ids = torch.randint(0, 8192, (1, 16), generator=torch.Generator().manual_seed(1))
    _assert_plain(out, "qwen2_moe", dropped, _logits(compressed, ids), ids)
    dense = json.loads((out / MANIFEST_FILE).read_text())["dense_layers"]
    assert dense["zero_bytes"] == 2 * 3 * 1024 * 256 * 2  # bf16, as the source is stored


def test_layer_drop_streams_to_the_same_folder(layer_drop_outputs):
    _, mem, streamed = layer_drop_outputs
    _assert_same_folder(mem, streamed)


@pytest.mark.parametrize(
    "family,action,why",
    [
        ("qwen2_moe", Condense(experts=[2, 5], weights=[0.5, 0.3]), "keeps the per-token-gated shared expert"),
        ("qwen3_moe", Condense(experts=[0, 1, 2, 3, 4], weights=[0.2] * 5), "80 rows > intermediate_size 64"),
    ],
)
def test_layers_that_do_not_fit_keep_moepress_modules(family, action, why, tmp_path):
    model = tiny_model(family)
    moe = get_adapter(model).moe_layer_ids(model)
    # a dropped layer that would fit does not become dense either: only a plain output is worth the zeros
    plan = CompressionPlan(method="t", layers={moe[0]: action, moe[-1]: Drop()})
    config_before = list(model.config.mlp_only_layers)
    compressed = apply_plan(model, plan)
    layers = get_adapter(compressed, require_moe=False).layers(compressed)
    assert isinstance(layers[moe[0]].mlp, CondensedMLP) and isinstance(layers[moe[-1]].mlp, DroppedMLP)
    assert compressed.config.mlp_only_layers == config_before
    want = _logits(compressed)
    out = save_compressed(compressed, plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"moepress_{family}" and "moepress_structure" in config
    assert json.loads((out / MANIFEST_FILE).read_text())["dense_layers"] is None
    torch.testing.assert_close(_logits(moepress.load(out)), want, rtol=0, atol=1e-6)


def test_qwen2_moe_condensed_without_its_shared_expert_is_plain(tmp_path):
    model = tiny_model("qwen2_moe")
    moe = get_adapter(model).moe_layer_ids(model)
    plan = CompressionPlan(method="t", layers={moe[1]: Condense(keep_shared=False, experts=[3, 4], weights=[0.6, 0.4])})
    compressed = apply_plan(model, plan)
    out = save_compressed(compressed, plan, tmp_path / "out")
    _assert_plain(out, "qwen2_moe", [moe[1]], _logits(compressed))


def test_dense_layers_never_keeps_moepress_modules(tmp_path):
    model = tiny_model("qwen2_moe")
    moe = get_adapter(model).moe_layer_ids(model)
    plan = CompressionPlan(method="t", layers={moe[-1]: Drop()})
    predicted = predict_size(model, plan, dense_layers="never")
    compressed = apply_plan(model, plan, dense_layers="never")
    out = save_compressed(compressed, plan, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["model_type"] == "moepress_qwen2_moe"
    assert _written_bytes(out) == predicted.bytes < predict_size(tiny_model("qwen2_moe"), plan).bytes
    with pytest.raises(MoepressError, match="dense_layers"):
        apply_plan(tiny_model("qwen2_moe"), plan, dense_layers="always")


def test_uniform_pruning_with_dense_layers_is_plain(tmp_path):
    model = tiny_model("qwen3_moe")
    moe = get_adapter(model).moe_layer_ids(model)  # [1, 2]
    plan = CompressionPlan(method="t", layers={moe[0]: Prune(keep_experts=[0, 2, 3, 5, 6, 7]), moe[1]: Drop()})
    compressed = apply_plan(model, plan)
    out = save_compressed(compressed, plan, tmp_path / "out")
    _assert_plain(out, "qwen3_moe", [0, moe[1]], _logits(compressed))
    assert AutoConfig.from_pretrained(out).num_experts == 6


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(0, 4),
    extra=st.integers(0, 40),
    weights=st.lists(st.floats(-2, 2, allow_nan=False), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_padding_to_any_width_gives_the_same_outputs(k, extra, weights, seed):
    """k experts of 16 rows at any intermediate_size >= 16k: the dense MLP equals the CondensedMLP."""
    if 16 * k + extra == 0:
        return  # no dense MLP of width 0 to compare
    torch.manual_seed(seed)
    model = tiny_model("qwen3_moe", intermediate_size=16 * k + extra)
    moe = get_adapter(model).moe_layer_ids(model)
    plan = CompressionPlan(method="t", layers={moe[0]: Condense(experts=list(range(k)), weights=weights[:k])})
    condensed = apply_plan(copy.deepcopy(model), plan, dense_layers="never")
    dense = apply_plan(model, plan)
    a = get_adapter(dense, require_moe=False).layers(dense)[moe[0]].mlp
    b = get_adapter(condensed, require_moe=False).layers(condensed)[moe[0]].mlp
    assert type(a).__name__ == "Qwen3MoeMLP" and isinstance(b, CondensedMLP)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)
