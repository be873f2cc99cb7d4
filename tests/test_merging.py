"""Expert merging (hc-smoe, m-smoe, ream): exact merge arithmetic and neuron alignment, clustering,
reproducible plans, predicted bytes, `moepress compress` outputs that plain transformers reloads, the
streamed writer, and the top-k refusal."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from moepress.calibrate import calibrate
from moepress.cli import app
from moepress.data.text import fingerprint_ids
from moepress.errors import MoepressError
from moepress.io import predict_size, save_compressed
from moepress.methods import get_method
from moepress.methods.base import ModelInputs
from moepress.methods.m_smoe import weight_matching
from moepress.methods.merging import average_linkage, cosine_distance
from moepress.methods.ream import saliency
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Merge, Prune, model_fingerprint
from moepress.surgery import apply_plan
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import DATA

MERGING = ("hc-smoe", "m-smoe", "ream")
IDS = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(5))
_CACHE: dict[str, tuple] = {}


def calibrated(family: str):
    """(model, blocks, calibration result) of a tiny model, once per family."""
    if family not in _CACHE:
        model = tiny_model(family)
        meta = {"model_fingerprint": model_fingerprint(model), "data_fingerprint": fingerprint_ids(IDS)}
        result = calibrate(model, IDS, batch_size=2, keep_moe_inputs=512, meta=meta)
        _CACHE[family] = (model, get_adapter(model).blocks(model), result)
    return _CACHE[family]


def merge_plan(method: str, model, blocks, result, ratio: float = 0.25, **hp) -> CompressionPlan:
    extra = {"model_inputs": ModelInputs(model, IDS, batch_size=2)} if method == "ream" else {}
    return get_method(method)(result.stats, ratio, blocks=blocks, moe_inputs=result.moe_inputs, **extra, **hp)


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


# ---- the arithmetic ---------------------------------------------------------------------------------
def test_merging_two_identical_experts_gives_back_that_expert():
    model = tiny_model("olmoe")
    block = get_adapter(model).blocks(model)[0]
    with torch.no_grad():
        for src, dst in zip(block.experts.weights(2), block.experts.weights(5), strict=True):
            dst.copy_(src)
    want = [w.clone() for w in block.experts.weights(2)]
    keep = [e for e in range(8) if e != 5]
    plan = CompressionPlan(method="test", layers={0: Prune(keep_experts=keep, merges={
        2: Merge(members=[2, 5], coefficients=[0.3, 0.7])})})
    merged = apply_plan(model, plan)
    after = get_adapter(merged).block(0, get_adapter(merged).layers(merged)[0])
    for got, w in zip(after.experts.weights(keep.index(2)), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "remote"])
def test_a_permuted_copy_merges_exactly_after_alignment(family, request):
    """Expert 5 := expert 2 with its intermediate neurons shuffled (the same function); weight matching
    finds the shuffle, so the merge is expert 2 again; without alignment it is not."""
    source = copy.deepcopy(request.getfixturevalue("remote_code_model")) if family == "remote" else tiny_model(family)
    layer = get_adapter(source).moe_layer_ids(source)[0]
    block = get_adapter(source).blocks(source)[layer]
    shuffle = torch.randperm(block.expert_intermediate, generator=torch.Generator().manual_seed(0))
    gate, up, down = (w.clone() for w in block.experts.weights(2))
    with torch.no_grad():
        for dst, src in zip(block.experts.weights(5), (gate[shuffle], up[shuffle], down[:, shuffle]), strict=True):
            dst.copy_(src)
    x = torch.randn(16, block.hidden_size, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(block.expert(x, 5), block.expert(x, 2), rtol=1e-5, atol=1e-6)

    perm = weight_matching(block)(2, 5)
    assert torch.equal(shuffle[perm], torch.arange(block.expert_intermediate))
    keep = [e for e in range(8) if e != 5]
    for aligned in (True, False):
        model = copy.deepcopy(source)
        plan = CompressionPlan(method="test", layers={layer: Prune(keep_experts=keep, merges={
            2: Merge(members=[2, 5], coefficients=[0.5, 0.5], aligned=[5] if aligned else [])})})
        if aligned:
            plan.set_alignment(layer, 2, 5, perm)
        merged = apply_plan(model, plan)
        adapter = get_adapter(merged)
        after = adapter.block(layer, adapter.layers(merged)[layer])
        same = all(torch.equal(a, b) for a, b in zip(after.experts.weights(keep.index(2)), (gate, up, down),
                                                     strict=True))
        assert same == aligned


def test_average_linkage_joins_the_closest_clusters_by_mean_distance():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0], [30.0]])
    d = torch.cdist(points, points)
    assert average_linkage(d, 3) == [[0, 1], [2, 3], [4]]
    assert average_linkage(d, 2) == [[0, 1, 2, 3], [4]]
    assert average_linkage(d, 5) == [[0], [1], [2], [3], [4]]


def test_hc_smoe_clusters_duplicated_experts_together():
    """Experts 4..7 are copies of 0..3: at ratio 0.5 the four clusters are exactly the copies."""
    model = tiny_model("olmoe")
    blocks = get_adapter(model).blocks(model)
    with torch.no_grad():
        for block in blocks.values():
            for e in range(4):
                for src, dst in zip(block.experts.weights(e), block.experts.weights(e + 4), strict=True):
                    dst.copy_(src)
    result = calibrate(model, IDS, batch_size=2, keep_moe_inputs=512)
    plan = get_method("hc-smoe")(result.stats, 0.5, blocks=blocks, moe_inputs=result.moe_inputs)
    for i in blocks:
        assert plan.metadata["groups"][str(i)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
        freq = result.stats[i].frequency
        for rep, merge in plan.layers[i].merges.items():
            assert freq[rep] == max(freq[m] for m in merge.members)  # the most used member's row stays
            total = sum(float(freq[m]) for m in merge.members)
            assert merge.coefficients == pytest.approx([float(freq[m]) / total for m in merge.members])
    assert cosine_distance(torch.eye(3))[0, 1] == pytest.approx(1.0)


# ---- plans -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", MERGING)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_plan_keeps_the_ratio_predicts_the_bytes_and_reloads_plainly(method, family, tmp_path):
    """`router=representative`: the output is the source architecture (the default, all router rows
    kept, is tested in test_merge_routing.py)."""
    model, blocks, result = calibrated(family)
    plan = merge_plan(method, model, blocks, result, router="representative")
    plan.validate_for(model)
    for i, action in plan.layers.items():
        assert isinstance(action, Prune) and len(action.keep_experts) == 6 and not action.novices
        members = sorted(m for g in plan.metadata["groups"][str(i)] for m in g)
        assert members == list(range(8))  # every expert is in exactly one group
        gone = set(range(8)) - set(action.keep_experts)
        assert gone == {m for r, g in action.merges.items() for m in g.members if m != r}
        for merge in action.merges.values():
            assert sum(merge.coefficients) == pytest.approx(1.0)
            assert merge.aligned == ([] if method == "hc-smoe" else [m for m in merge.members
                                                                        if m not in action.keep_experts])
    saved = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert saved.to_json() == plan.to_json() and saved.tensors.keys() == plan.tensors.keys()

    predicted = predict_size(model, plan)
    compressed = apply_plan(copy.deepcopy(model), saved)
    out = save_compressed(compressed, saved, tmp_path / "out")  # reloads and compares logits itself
    with safe_open(out / "model.safetensors", "pt") as f:
        written = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert written == predicted.params and written * 4 == predicted.bytes  # float32
    config = json.loads((out / "config.json").read_text())
    assert "moepress_structure" not in config
    assert getattr(AutoModelForCausalLM.from_pretrained(out).config, get_adapter(model).num_experts_key) == 6


@pytest.mark.parametrize("method", MERGING)
def test_same_data_gives_the_same_plan(method):
    model, blocks, _ = calibrated("qwen2_moe")
    plans = [merge_plan(method, model, blocks, calibrate(model, IDS, batch_size=2, keep_moe_inputs=512))
             for _ in range(2)]
    assert plans[0].to_json() == plans[1].to_json()
    assert plans[0].tensors.keys() == plans[1].tensors.keys()
    assert all(torch.equal(plans[0].tensors[k], plans[1].tensors[k]) for k in plans[0].tensors)


def test_ream_leaves_the_model_unchanged_and_sequential_changes_later_layers():
    model, blocks, result = calibrated("qwen3_moe")  # MoE layers 1 and 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sequential = merge_plan("ream", model, blocks, result)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    original = merge_plan("ream", model, blocks, result, sequential=False)
    # the first MoE layer sees the same inputs either way; the second sees the merged first layer's outputs
    assert sequential.metadata["scores"]["1"] == original.metadata["scores"]["1"]
    assert sequential.metadata["scores"]["2"] != original.metadata["scores"]["2"]
    assert original.metadata["scores"]["2"] == pytest.approx(saliency(result.stats[2]).tolist())


def test_top_k_above_the_kept_experts_is_refused_naming_the_largest_ratio():
    model, blocks, result = calibrated("olmoe")  # 8 experts, top-2: at most 6 may go
    for method in MERGING:
        with pytest.raises(MoepressError, match=r"ratio too high.*use a ratio of at most 0\.75"):
            merge_plan(method, model, blocks, result, ratio=0.85)
    with pytest.raises(MoepressError, match="re-runs the model"):
        get_method("ream")(result.stats, 0.25)
    with pytest.raises(MoepressError, match="keep_moe_inputs"):
        get_method("hc-smoe")(result.stats, 0.25)


# ---- the command line ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text((DATA / "calib.txt").read_text()[:20_000])
    return path


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_compress_writes_a_plain_checkpoint_equal_to_the_applied_plan(family, calib_text, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("moepress.compression.write_report_if_available", lambda out: None)  # not under test
    runner = CliRunner()
    source = tmp_path / "tiny"
    assert runner.invoke(app, ["demo-model", "-o", str(source), "--family", family]).exit_code == 0
    for method in MERGING:
        out = tmp_path / method
        result = runner.invoke(app, ["compress", str(source), "--method", method, "--ratio", "0.25", "--data",
                                     str(calib_text), "-n", "2", "--seq-len", "32", "-o", str(out),
                                     "--hp", "router=representative"])
        assert result.exit_code == 0, result.output
        plain = AutoModelForCausalLM.from_pretrained(out)
        applied = apply_plan(AutoModelForCausalLM.from_pretrained(source), CompressionPlan.load(
            out / "moepress_plan.json"))
        ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(_logits(plain, ids), _logits(applied, ids), rtol=1e-5, atol=1e-5)
    too_far = runner.invoke(app, ["compress", str(source), "--method", "m-smoe", "--ratio", "0.9", "--data",
                                  str(calib_text), "-n", "2", "--seq-len", "32", "-o", str(tmp_path / "no")])
    # a user error (the installed `moepress` prints it as one line and exits 2), before the model loads
    assert isinstance(too_far.exception, MoepressError) and "use a ratio of at most 0.75" in str(too_far.exception)
    assert "\n" not in str(too_far.exception)


# ---- the streamed writer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["all-rows", "representative"])
@pytest.mark.parametrize("family", ["deepseek_v2", "mixtral"])
def test_streamed_merge_equals_in_memory(family, router, tmp_path):
    """`apply --stream` (one decoder layer at a time) writes bit for bit what the in-memory path writes."""
    from moepress.io.stream_save import save_compressed_streaming

    src = tmp_path / "src"
    tiny_model(family, dtype=torch.bfloat16).save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    result = calibrate(model, IDS, batch_size=2, keep_moe_inputs=64)
    plan = get_method("m-smoe")(result.stats, 0.25, blocks=get_adapter(model).blocks(model),
                                moe_inputs=result.moe_inputs, router=router)
    assert plan.tensors  # aligned members: permutations travel in the plan
    mem = save_compressed(apply_plan(model, plan), plan, tmp_path / "mem", source=src)
    streamed = save_compressed_streaming(src, plan, tmp_path / "stream", dtype=torch.bfloat16)

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in sorted(folder.glob("model*.safetensors")):
            with safe_open(shard, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    a, b = tensors(mem), tensors(streamed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (mem / "config.json").read_text() == (streamed / "config.json").read_text()
