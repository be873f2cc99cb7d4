"""Merges that keep every router row (`router=all-rows`, the default of hc-smoe, m-smoe and ream): the
compressed block equals the original block whose merged members all hold the merged weights (the
references' computation), float64; the checkpoint stores E' experts once and E router rows, weighs what
the plan predicts, loads with `moepress.load` and is refused by a plain `from_pretrained`."""

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

import moepress
from moepress.cli import app
from moepress.errors import MoepressError
from moepress.io import predict_size, save_compressed
from moepress.io.manifest import MANIFEST_FILE
from moepress.methods.merging import check_router
from moepress.models import get_adapter
from moepress.modules import MappedExperts
from moepress.plan import CompressionPlan, Merge, Prune
from moepress.surgery import apply_plan
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import DATA, MODELS
from .test_merging import MERGING, calibrated, merge_plan

MINIS = ("qwen2moe-mini", "olmoe-mini", "dsv2-mini")


def _groups(n_experts: int, size: int) -> list[list[int]]:
    """Consecutive groups of `size` experts (8 experts: [[0, 1, 2, 3], [4], [5, 6], [7]])."""
    if n_experts == 8:
        return [[0, 1, 2, 3], [4], [5, 6], [7]]
    return [list(range(s, min(s + size, n_experts))) for s in range(0, n_experts, size)]


def _mapped_plan(block, layer: int, seed: int = 0) -> CompressionPlan:
    """Random coefficients, the second member of each group aligned by a random permutation, the
    representative the last member (so router rows of lower ids map past their own position)."""
    g = torch.Generator().manual_seed(seed)
    merges, keep, perms = {}, [], {}
    for group in _groups(block.num_experts, 4):
        rep = group[-1]
        keep.append(rep)
        if len(group) < 2:
            continue
        c = torch.rand(len(group), generator=g, dtype=torch.float64) + 0.1
        merges[rep] = Merge(members=group, coefficients=(c / c.sum()).tolist(), aligned=[group[1]])
        perms[rep, group[1]] = torch.randperm(block.expert_intermediate, generator=g)
    plan = CompressionPlan(method="test", layers={layer: Prune(keep_experts=keep, merges=merges, router_rows="all")})
    for (rep, member), perm in perms.items():
        plan.set_alignment(layer, rep, member, perm)
    return plan


@torch.no_grad()
def _reference(model, layer: int, plan: CompressionPlan):
    """A copy of `model` in which every member of each merge holds the merged weights, computed here
    directly: Σ_j c_j · (gate[p_j], up[p_j], down[:, p_j]) of member j."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    block = adapter.block(layer, adapter.layers(ref)[layer])
    action, perms = plan.layers[layer], plan.alignments(layer)
    merged = {}
    for rep, merge in action.merges.items():
        parts = []
        for m, c in zip(merge.members, merge.coefficients, strict=True):
            gate, up, down = block.experts.weights(m)
            p = perms.get((rep, m), torch.arange(up.shape[0]))
            parts.append([c * w for w in (gate[p], up[p], down[:, p])])
        merged[rep] = [sum(ws) for ws in zip(*parts, strict=True)]
    for rep, merge in action.merges.items():
        for m in merge.members:
            for view, value in zip(block.experts.weights(m), merged[rep], strict=True):
                view.copy_(value)
    return ref


def _mlp(model, layer: int, path: str):
    """The MoE block module at `path` under decoder layer `layer` (the adapter's view reads the family's
    own experts module, which a compressed layer wraps)."""
    return get_adapter(model, require_moe=False).layers(model)[layer].get_submodule(path)


def _block_out(model, layer: int, path: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = _mlp(model, layer, path)(x[None])
    return (out[0] if isinstance(out, tuple) else out)[0]


def _check_against_reference(model, layer: int) -> None:
    model.set_experts_implementation("eager")  # float64: the grouped GEMM takes no doubles
    adapter = get_adapter(model)
    block = adapter.block(layer, adapter.layers(model)[layer])
    plan = _mapped_plan(block, layer)
    x = torch.randn(96, block.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    # the test is only as good as its inputs: tokens must choose several rows of one merged expert
    group_of = {m: rep for rep, merge in plan.layers[layer].merges.items() for m in merge.members}
    chosen = block.route(x).index.tolist()
    repeats = sum(len({group_of.get(e, e) for e in row}) < len(row) for row in chosen)
    assert repeats >= 5, f"only {repeats} tokens chose two rows of one merged expert"

    path = next(n for n, m in adapter.layers(model)[layer].named_modules() if m is block.module)
    want = _block_out(_reference(model, layer, plan), layer, path, x)
    compressed = apply_plan(copy.deepcopy(model), plan)
    experts = _mlp(compressed, layer, path).get_submodule("experts")
    assert isinstance(experts, MappedExperts)
    assert experts.kept.num_experts == len(plan.layers[layer].keep_experts)
    torch.testing.assert_close(_block_out(compressed, layer, path, x), want, rtol=1e-10, atol=1e-12)
    # the plan's own view of the block computes the same (what search and REAM score)
    view = _reference(model, layer, plan)
    vblock = get_adapter(view).block(layer, get_adapter(view).layers(view)[layer])
    torch.testing.assert_close(vblock.forward(x, plan.layers[layer]), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_mapped_routing_equals_members_sharing_the_merged_weights(family):
    model = tiny_model(family, dtype=torch.float64)
    _check_against_reference(model, get_adapter(model).moe_layer_ids(model)[0])


@pytest.mark.parametrize("mini", MINIS)
def test_mapped_routing_on_the_bundled_minis(mini):
    path = MODELS / mini
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} not present")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    _check_against_reference(model, get_adapter(model).moe_layer_ids(model)[1])


# ---- the methods and their checkpoints ----------------------------------------------------------------
def _written_params(out: Path) -> int:
    total = 0
    for shard in out.glob("model*.safetensors"):
        with safe_open(shard, "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize(("method", "family"), [(m, "olmoe") for m in MERGING] + [
    ("hc-smoe", f) for f in TINY_FAMILIES if f != "olmoe"])
def test_all_rows_is_the_default_and_its_checkpoint_round_trips(method, family, tmp_path):
    model, blocks, result = calibrated(family)
    plan = merge_plan(method, model, blocks, result)
    assert plan.hyperparameters["router"] == "all-rows"
    adapter = get_adapter(model)
    n = {i: blocks[i].num_experts for i in plan.layers}
    for i, action in plan.layers.items():
        assert action.router_rows == "all" and len(action.keep_experts) == 6
        routes = action.expert_map(n[i])
        for rep, merge in action.merges.items():  # every member reaches its merge
            assert {routes[m] for m in merge.members} == {action.keep_experts.index(rep)}
    saved = CompressionPlan.load(plan.save(tmp_path / "plan.json"))
    assert saved.to_json() == plan.to_json()

    predicted = predict_size(model, saved)
    compressed = apply_plan(copy.deepcopy(model), saved)
    out = save_compressed(compressed, saved, tmp_path / "out")  # reloads and compares logits itself
    assert _written_params(out) == predicted.params
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["bytes_after"]["total"] == predicted.bytes and not manifest["plain_architecture"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"moepress_{model.config.model_type}"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    for i in plan.layers:
        spec = config["moepress_structure"]["layers"][str(i)]
        assert spec["expert_map"] == plan.layers[i].expert_map(8) and len(spec["experts"]) == 6
    with safe_open(out / "model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    layer = min(plan.layers)
    router = [s for k, s in shapes.items() if f"layers.{layer}." in k and k.endswith("gate.weight")
              and "gate_proj" not in k]
    stored = [s for k, s in shapes.items() if f"layers.{layer}." in k and "experts.kept." in k]
    assert router and router[0][0] == 8 and stored and all(s[0] == 6 for s in stored)

    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(3))
    want = _logits(compressed, ids)
    loaded = moepress.load(out)
    assert getattr(loaded.config.get_text_config(), adapter.num_experts_key) == 8  # the router keeps its E rows
    torch.testing.assert_close(_logits(loaded, ids), want, rtol=1e-5, atol=1e-5)
    with pytest.raises((ValueError, KeyError)):  # unknown model_type without the folder's code
        AutoModelForCausalLM.from_pretrained(out)
    if method == "hc-smoe" and family == "olmoe":  # the folder's own code rebuilds the same model
        remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
        torch.testing.assert_close(_logits(remote, ids), want, rtol=1e-5, atol=1e-5)


def test_compress_cli_writes_both_router_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("moepress.compression.write_report_if_available", lambda out: None)  # not under test
    runner = CliRunner()
    source = tmp_path / "tiny"
    assert runner.invoke(app, ["demo-model", "-o", str(source), "--family", "qwen2_moe"]).exit_code == 0
    calib = tmp_path / "calib.txt"
    calib.write_text((DATA / "calib.txt").read_text()[:20_000])
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    for router in ("all-rows", "representative"):
        out = tmp_path / router
        result = runner.invoke(app, ["compress", str(source), "--method", "hc-smoe", "--ratio", "0.25", "--data",
                                     str(calib), "-n", "2", "--seq-len", "32", "-o", str(out), "--hp",
                                     f"router={router}"])
        assert result.exit_code == 0, result.output
        plan = CompressionPlan.load(out / "moepress_plan.json")
        assert plan.hyperparameters["router"] == router
        applied = apply_plan(AutoModelForCausalLM.from_pretrained(source), plan)
        config = json.loads((out / "config.json").read_text())
        kind = "qwen2_moe" if router == "representative" else "moepress_qwen2_moe"
        assert config["model_type"] == kind
        assert moepress.load(out).config.num_experts == (6 if router == "representative" else 8)
        torch.testing.assert_close(_logits(moepress.load(out), ids), _logits(applied, ids), rtol=1e-5, atol=1e-5)


# ---- refusals -------------------------------------------------------------------------------------------
def test_a_plan_routing_an_expert_nowhere_or_with_novices_is_refused():
    model = tiny_model("olmoe")
    plan = CompressionPlan(method="t", layers={0: Prune(keep_experts=[0, 1, 2, 3, 4, 5], merges={
        5: Merge(members=[5, 6], coefficients=[0.5, 0.5])}, router_rows="all")})
    with pytest.raises(MoepressError, match=r"experts \[7\] are neither kept nor merged"):
        plan.validate_for(model)
    with pytest.raises(ValueError, match="takes no novices"):
        Prune(keep_experts=[0, 1], novices=[2], router_rows="all")


def test_all_rows_is_refused_where_the_block_cannot_map_and_bad_modes_are_named():
    model = tiny_model("llama4_text")
    blocks = get_adapter(model).blocks(model)
    with pytest.raises(MoepressError, match="router=representative") as err:
        check_router("hc-smoe", "all-rows", blocks)
    assert "\n" not in str(err.value)
    check_router("hc-smoe", "representative", blocks)
    with pytest.raises(MoepressError, match="router must be one of all-rows, representative"):
        check_router("m-smoe", "all", None)
    layer = min(blocks)
    plan = CompressionPlan(method="t", layers={layer: Prune(keep_experts=list(range(1, 8)), merges={
        1: Merge(members=[0, 1], coefficients=[0.5, 0.5])}, router_rows="all")})
    with pytest.raises(MoepressError, match="cannot keep all router rows"):
        apply_plan(model, plan)



def test_plan_diff_and_summary_name_the_router_mode():
    from moepress.surgery import diff_plans
    from moepress.surgery.diff import describe_action

    merges = {5: Merge(members=[5, 6, 7], coefficients=[0.2, 0.3, 0.5])}
    kept = CompressionPlan(method="t", layers={0: Prune(keep_experts=[0, 1, 2, 3, 4, 5], merges=merges)})
    every = CompressionPlan(method="t", layers={0: Prune(keep_experts=[0, 1, 2, 3, 4, 5], merges=merges,
                                                         router_rows="all")})
    assert diff_plans(kept, every) == ["layer 0: router rows kept -> all"]
    assert describe_action(every.layers[0]).endswith("1 merged, every router row kept)")
    assert every.layers[0].expert_map(8) == [0, 1, 2, 3, 4, 5, 5, 5]
