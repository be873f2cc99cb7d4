"""No output loads silently wrong: plain transformers either refuses an output or reproduces it.

An output that needs moepress's modules has its own model_type (`moepress_<family>`): without
trust_remote_code, transformers must refuse it (not build the source architecture, drop the tensors it
does not know and random-initialise the rest); with it, it must load the output exactly as
`moepress.load` does. An output the source architecture expresses keeps the source model_type and
loads plainly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, dynamic_module_utils

import moepress
from moepress.io import save_compressed
from moepress.models import get_adapter
from moepress.surgery import apply_plan
from moepress.testing import tiny_model

from .conftest import kind_plan, mini_model_path

REMOTE = "remote_deepseek_moe"  # a DeepSeekMoE-16B style source whose architecture is code in its folder
FAMILIES = ("deepseek_v2", "qwen2_moe", "olmoe", "mixtral", REMOTE)
KINDS = ("keep", "prune_uniform", "prune_novices", "prune_nonuniform", "condense", "drop", "mixed")
PLAIN_KINDS = ("keep", "prune_uniform")  # expressible in the source architecture
# also expressible: a dropped layer as the family's own (zero) dense MLP in `mlp_only_layers` (test_dense_layers.py)
DENSE_PLAIN = {("qwen2_moe", "drop")}
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _refuse_without_asking(monkeypatch):
    """On a terminal transformers asks for 15 s whether to run a folder's code; CI's setting refuses at once."""
    monkeypatch.setattr(dynamic_module_utils, "TIME_OUT_REMOTE_CODE", 0)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _assert_refused(out: Path) -> None:
    """Without trust_remote_code (left out, or False), transformers' own error asks for it."""
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoModelForCausalLM.from_pretrained(out, **kwargs)
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            AutoConfig.from_pretrained(out, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_transformers_refuses_or_reproduces_the_output(family, kind, tmp_path, request):
    remote = family == REMOTE
    model = copy.deepcopy(request.getfixturevalue("remote_code_model")) if remote else tiny_model(family)
    source_type = model.config.model_type
    plan = kind_plan(kind, get_adapter(model).moe_layer_ids(model))
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    want = _logits(moepress.load(out, trust_remote_code=remote))
    torch.testing.assert_close(want, _logits(model), rtol=0, atol=1e-6)

    plain = kind in PLAIN_KINDS or (family, kind) in DENSE_PLAIN
    if plain:
        assert config["model_type"] == source_type and ("auto_map" in config) == remote
    else:  # what a serving engine reads: a model_type and an architecture no loader of the source knows
        assert config["model_type"] == f"moepress_{source_type}" and config["model_type"] not in CONFIG_MAPPING
        assert config["architectures"] == [f"Moepress{type(model).__name__}"]
        assert not hasattr(transformers, config["architectures"][0])
    if plain and not remote:
        for kwargs in ({}, {"trust_remote_code": False}, {"trust_remote_code": True}):
            plain = AutoModelForCausalLM.from_pretrained(out, **kwargs)
            torch.testing.assert_close(_logits(plain), want, rtol=0, atol=1e-6)
        return
    _assert_refused(out)
    trusted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(_logits(trusted), want, rtol=0, atol=1e-6)
    if kind in PLAIN_KINDS:
        return
    assert type(trusted).__name__ == config["architectures"][0]
    # the source family's config class under the output's model_type, so family code keeps working on it
    # (by name: a remote-code source's classes are loaded anew from each folder)
    assert type(model.config).__name__ in [c.__name__ for c in type(trusted.config).__mro__]
    assert trusted.config.model_type == config["model_type"]
    assert get_adapter(trusted, require_moe=False).family == get_adapter(model, require_moe=False).family


def test_outputs_written_before_their_own_model_type_still_load(tmp_path):
    """A folder from an older moepress (source model_type, structure, auto_map to the model only)."""
    model = tiny_model("qwen2_moe")
    plan = kind_plan("mixed", get_adapter(model).moe_layer_ids(model))
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="qwen2_moe", architectures=["MoepressForCausalLM"])
    del config["auto_map"]["AutoConfig"]
    (out / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(_logits(moepress.load(out)), _logits(model), rtol=0, atol=1e-6)


def test_dsv2_mini_mone_output_is_refused_without_trust(tmp_path):
    """The real bf16 checkpoint compressed by MoNE at ratio 0.25: the case that loaded silently wrong."""
    from moepress.calibrate import calibrate
    from moepress.methods import get_method
    from moepress.models.loading import load_model

    source = mini_model_path("dsv2-mini")
    model, _ = load_model(source, dtype="bfloat16")
    ids = torch.randint(0, 8192, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = get_method("mone")(calibrate(model, ids, batch_size=2).stats, 0.25)
    assert any(plan.novices(i) for i in plan.layers)
    out = save_compressed(apply_plan(model, plan), plan, tmp_path / "out", source=source)

    config = json.loads((out / "config.json").read_text())
    # every router row kept: vLLM's native format, under the source model_type; transformers' own class
    # refuses it (the stored experts do not have the configured count), trust_remote_code follows auto_map
    assert config["model_type"] == "deepseek_v2" and config["approximate_experts"]
    for kwargs in ({}, {"trust_remote_code": False}):
        with pytest.raises(RuntimeError, match="mismatch"):
            AutoModelForCausalLM.from_pretrained(out, **kwargs)
    trusted = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert trusted.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(trusted(ids).logits, model(ids).logits)
