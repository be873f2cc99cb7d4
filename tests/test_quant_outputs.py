"""MXFP4 inputs (gpt-oss's published format) compressed into MXFP4 outputs: every kept expert's blocks and
scales copied bit for bit, whichever output format holds it (plain for a uniform prune, moepress's own for
novices: gpt-oss stores a layer's experts in one tensor, so the native novice format does not apply)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moepress
from moepress.demo.grammar import corpus
from moepress.plan import CompressionPlan
from moepress.quant.fixtures import write_tiny_gpt_oss_mxfp4
from moepress.quant.requantize import load_kwargs
from moepress.surgery import apply_plan

from .quant_helpers import stored_tensors
from .test_cli import ok


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mxfp4") / "tiny-gpt-oss"
    write_tiny_gpt_oss_mxfp4(folder)
    return folder


@pytest.mark.parametrize("method", ["frequency", "mone"])
def test_mxfp4_output_copies_kept_experts_asstored_tensors(mxfp4, tmp_path, method):
    text = tmp_path / "calib.txt"
    text.write_text(corpus(3000, seed=1))
    out = tmp_path / "out"
    ok(["compress", mxfp4, "--method", method, "--ratio", "0.25", "--data", text, "-n", "8", "--seq-len", "64",
        "-o", out])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    source, written = stored_tensors(mxfp4), stored_tensors(out)
    plan = CompressionPlan.load(out / "moepress_plan.json")
    experts = "kept." if method == "mone" else ""  # a novice layer keeps its retained experts in `kept`
    for layer, entry in plan.layers.items():
        for proj in ("gate_up_proj", "down_proj"):
            for part in ("_blocks", "_scales"):
                got = written[f"model.layers.{layer}.mlp.experts.{experts}{proj}{part}"]
                want = source[f"model.layers.{layer}.mlp.experts.{proj}{part}"][entry.keep_experts]
                assert got.dtype == torch.uint8 and torch.equal(got, want)
    expert_bytes = {k: t.numel() * t.element_size() for k, t in source.items() if "_blocks" in k or "_scales" in k}
    out_expert = sum(t.numel() * t.element_size() for k, t in written.items() if "_blocks" in k or "_scales" in k)
    assert out_expert == sum(expert_bytes.values()) * 6 // 8  # 6 of 8 experts kept in every layer
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "mxfp4" and not manifest["quantization"]["quantized"]
    assert manifest["stored_bytes_after"] < manifest["stored_bytes_before"]
    # dequantise → compress with the same plan: the output read back dequantised gives the same logits
    reference = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32, **load_kwargs(mxfp4)).eval()
    reference = apply_plan(reference, plan)
    loaded = moepress.load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12]])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded(ids).logits
    assert torch.allclose(want, got, atol=2e-2 * want.abs().max().item()), (want - got).abs().max()


def test_inspect_reads_quantised_inputs_and_novice_outputs(mxfp4, tmp_path):
    """`moepress inspect` on an MXFP4 input says what is stored; on a novice output (its first MoE layer
    holds moepress's modules) it still summarises."""
    text = tmp_path / "calib.txt"
    text.write_text(corpus(3000, seed=1))
    shown = ok(["inspect", mxfp4])
    assert "stored in mxfp4" in shown and "family gpt_oss" in shown.replace("\n", " ")
    out = tmp_path / "out"
    ok(["compress", mxfp4, "--method", "mone", "--ratio", "0.25", "--data", text, "-n", "8", "--seq-len", "64",
        "-o", out])
    shown = ok(["inspect", out])
    assert "routed experts 8" in shown and "stored in mxfp4" in shown
