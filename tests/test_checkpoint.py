"""Checkpoint output: every family × every action round-trips through the written folder, whose
bytes equal the prediction; plain folders load with plain transformers; writing is atomic and safe."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import moepress
from moepress.errors import MoepressError
from moepress.io import MANIFEST_FILE, PLAN_FILE, load, predict_size, save_compressed, size_of
from moepress.models import get_adapter
from moepress.plan import CompressionPlan, Drop, Prune
from moepress.surgery import apply_plan
from moepress.testing import TINY_FAMILIES, tiny_model

from .conftest import kind_plan, mini_model_path

REMOTE = "remote_deepseek_moe"
FAMILIES = (*TINY_FAMILIES, REMOTE)



def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


def _written(folder: Path) -> tuple[int, int]:
    """(parameters, tensor bytes) in the folder's weight shards."""
    params = nbytes = 0
    for shard in _shard_files(folder):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                params += n
                nbytes += n * {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
    return params, nbytes


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


KINDS = ("keep", "prune_uniform", "prune_novices", "prune_nonuniform", "condense", "drop")
# plain too: the condensed or dropped layer becomes the family's own dense MLP listed in `mlp_only_layers`
# (tests/test_dense_layers.py); Qwen2-MoE's condensed layer keeps its per-token-gated shared expert, so not it
DENSE_PLAIN = {("qwen2_moe", "drop"), ("qwen3_moe", "condense"), ("qwen3_moe", "drop")}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, kind, remote_code_model, tmp_path):
    source = copy.deepcopy(remote_code_model) if family == REMOTE else tiny_model(family)
    adapter = get_adapter(source)
    plan = kind_plan(kind, adapter.moe_layer_ids(source))
    before = size_of(source)
    predicted = predict_size(source, plan)
    model = apply_plan(source, plan)
    out = save_compressed(model, plan, tmp_path / "out", max_shard_size="40KB")

    assert _written(out) == (predicted.params, predicted.bytes)
    assert len(_shard_files(out)) > 1  # sharded
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["bytes_before"]["total"] == before.bytes
    assert manifest["bytes_after"]["total"] == predicted.bytes
    assert manifest["plain_architecture"] == (kind in ("keep", "prune_uniform") or (family, kind) in DENSE_PLAIN)
    assert CompressionPlan.load(out / PLAN_FILE).layers == plan.layers

    config = json.loads((out / "config.json").read_text())
    remote = family == REMOTE
    if manifest["plain_architecture"]:
        assert "moepress_structure" not in config and not (out / "modeling_moepress.py").exists()
        n_experts = getattr(
            AutoConfig.from_pretrained(out, trust_remote_code=remote), adapter.num_experts_key
        )
        assert n_experts == (6 if kind == "prune_uniform" else 8)
        assert ("auto_map" in config) == remote
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
    else:
        # its own model_type and architecture, so nothing builds the source architecture from it
        architecture = f"Moepress{type(model).__name__}"
        assert config["model_type"] == f"moepress_{model.config.model_type}"
        assert config["architectures"] == [architecture]
        assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_moepress.{architecture}"
        reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    if remote:
        assert (out / "modeling_deepseek.py").is_file() and (out / "configuration_deepseek.py").is_file()
    via_moepress = moepress.load(out, trust_remote_code=remote)

    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    for m in (reloaded.eval(), via_moepress):
        torch.testing.assert_close(_logits(m, ids), want, rtol=1e-5, atol=1e-5)
        assert size_of(m) == predicted
        assert m.generate(ids[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 7)


def test_remote_code_checkpoint_needs_trust(remote_code_model, tmp_path):
    model = copy.deepcopy(remote_code_model)
    plan = kind_plan("drop", get_adapter(model).moe_layer_ids(model))
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out")
    with pytest.raises(MoepressError, match="trust_remote_code"):
        load(out)


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture
def source_folder(tmp_path) -> Path:
    """A tiny qwen2_moe checkpoint folder with tokenizer files, loaded the way users load one."""
    folder = tmp_path / "src"
    tiny_model("qwen2_moe").save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return folder


def test_writer_copies_tokenizer_and_never_touches_the_input(source_folder, tmp_path):
    digest = _tree_digest(source_folder)
    model = AutoModelForCausalLM.from_pretrained(source_folder).eval()
    plan = CompressionPlan(method="t", layers={1: Drop()})
    apply_plan(model, plan)
    out = save_compressed(model, plan, tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (source_folder / name).read_bytes()
    assert json.loads((out / MANIFEST_FILE).read_text())["source_path"] == str(source_folder)
    assert _tree_digest(source_folder) == digest

    with pytest.raises(MoepressError, match="is the input"):
        save_compressed(model, plan, source_folder, overwrite=True)
    with pytest.raises(MoepressError, match="already exists"):
        save_compressed(model, plan, out)
    (out / "stale.txt").write_text("old")
    save_compressed(model, plan, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert _tree_digest(source_folder) == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_failed_write_leaves_nothing(monkeypatch, tmp_path):
    import moepress.io.save as save_module

    def broken(*args, **kwargs):
        raise RuntimeError("the written checkpoint does not reproduce the model")

    monkeypatch.setattr(save_module, "verify_checkpoint", broken)
    model = tiny_model("mixtral")
    plan = CompressionPlan(method="t", layers={0: Drop()})
    apply_plan(model, plan)
    with pytest.raises(RuntimeError):
        save_compressed(model, plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_saving_an_uncompressed_model_is_refused(tmp_path):
    with pytest.raises(MoepressError, match="apply_plan"):
        save_compressed(tiny_model("olmoe"), CompressionPlan(method="t"), tmp_path / "out")


def test_dsv2_mini_uniform_prune_is_a_plain_checkpoint(tmp_path):
    """48 of 64 routed experts per layer, bf16: a folder plain transformers loads, bytes as predicted."""
    dsv2_mini = mini_model_path("dsv2-mini")
    model = AutoModelForCausalLM.from_pretrained(dsv2_mini, dtype=torch.bfloat16).eval()
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    plan = CompressionPlan(
        method="test",
        layers={
            i: Prune(keep_experts=torch.randperm(64, generator=g)[:48].tolist())
            for i in adapter.moe_layer_ids(model)
        },
    )
    predicted = predict_size(model, plan)
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out")
    assert _written(out) == (predicted.params, predicted.bytes)
    config = json.loads((out / "config.json").read_text())
    assert config["n_routed_experts"] == 48 and config["model_type"] == "deepseek_v2"
    assert "auto_map" not in config and "moepress_structure" not in config
    assert (out / "tokenizer.json").read_bytes() == (dsv2_mini / "tokenizer.json").read_bytes()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    ids = torch.randint(0, 8192, (1, 16), generator=g)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    shutil.rmtree(out)
