"""Block-FP8 inputs (DeepSeek-V3's published format): read dequantised, compressed, and written back in
FP8 with every weight a plan only slices copied bit for bit with its scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moepress
from moepress.cli import app
from moepress.demo.grammar import corpus
from moepress.errors import MoepressError
from moepress.plan import CompressionPlan
from moepress.quant import folder_scheme, scheme_for
from moepress.quant.block_fp8 import BlockFP8
from moepress.quant.requantize import load_kwargs
from moepress.surgery import apply_plan
from moepress.testing import write_tiny_fp8_model

from .quant_helpers import same_bits, stored_tensors
from .test_cli import ok, runner

EXPERT = ".mlp.experts."






def _nbytes(tensors: dict[str, torch.Tensor], experts: bool) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if (EXPERT in k) == experts)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fp8") / "tiny-v3-fp8"
    write_tiny_fp8_model(folder)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(corpus(3000, seed=1))
    return path


def test_block_fp8_round_trip_and_transformers_dequantisation_agree(fp8):
    scheme = folder_scheme(fp8)
    assert isinstance(scheme, BlockFP8) and scheme.block == (16, 16)
    stored = stored_tensors(fp8)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    w = scheme.dequantize(name, stored, torch.float32)
    again = scheme.quantize(name, w)  # re-quantising a dequantised weight gives back its stored bits
    assert same_bits(again[name], stored[name])
    assert torch.allclose(again[name + "_scale_inv"], stored[name + "_scale_inv"], rtol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32, **load_kwargs(fp8))
    fused = model.model.layers[1].mlp.experts.down_proj[3]
    assert torch.equal(fused, w)  # transformers' dequantisation on load is moepress's, bit for bit


@pytest.mark.parametrize("method", ["frequency", "mone"])
@pytest.mark.parametrize("stream", [False, True])
def test_compressed_fp8_output_keeps_the_input_format(fp8, text, tmp_path, method, stream):
    out = tmp_path / "out"
    ok(["compress", fp8, "--method", method, "--ratio", "0.25", "--data", text, "-n", "8", "--seq-len", "64",
        "-o", out, *(["--stream"] if stream else [])])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((fp8 / "config.json").read_text())["quantization_config"]
    source, written = stored_tensors(fp8), stored_tensors(out)
    plan = CompressionPlan.load(out / "moepress_plan.json")
    native = bool(config.get("approximate_experts"))
    assert native == (method == "mone")
    # every kept expert's FP8 weight and scale, under its output id, equals the input's bit for bit
    compared = 0
    for layer, entry in plan.layers.items():
        for new_id, old_id in enumerate(entry.keep_experts):
            out_id = old_id if native else new_id
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "weight_scale_inv"):
                    a = written[f"model.layers.{layer}.mlp.experts.{out_id}.{proj}.{suffix}"]
                    assert same_bits(a, source[f"model.layers.{layer}.mlp.experts.{old_id}.{proj}.{suffix}"])
                    compared += 1
    assert compared
    for name, tensor in source.items():  # attention, shared experts, norms untouched; routers sliced
        if EXPERT in name:
            continue
        if ".mlp.gate." in name and not native:
            layer = int(name.split(".")[2])
            tensor = tensor[plan.layers[layer].keep_experts]
        assert same_bits(written[name], tensor), name
    # bytes: the experts shrink by the ratio (novices add one bf16 vector each), the rest is the input's
    kept = sum(len(entry.keep_experts) for entry in plan.layers.values())
    total = 8 * len(plan.layers)
    novice_bytes = sum(t.numel() * t.element_size() for k, t in written.items()
                       if EXPERT in k and k.endswith("approx_value"))
    assert _nbytes(written, experts=True) - novice_bytes == _nbytes(source, experts=True) * kept // total
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert manifest["quantization"]["scheme"] == "block-fp8" and not manifest["quantization"]["quantized"]
    assert manifest["stored_bytes_after"] < manifest["stored_bytes_before"]
    assert "block-fp8" in (out / "README.md").read_text()  # the model card says how it is stored
    # logits: dequantise → compress (the same plan) equals the output read back dequantised
    reference = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32, **load_kwargs(fp8)).eval()
    reference = apply_plan(reference, plan)
    loaded = moepress.load(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 33, 70, 12]])
    with torch.no_grad():
        want, got = reference(ids).logits, loaded(ids).logits
    # novice vectors are stored in bf16; everything else is the same FP8 value
    assert torch.allclose(want, got, atol=2e-2 * want.abs().max().item()), (want - got).abs().max()


def test_new_weights_are_quantised_in_the_input_scheme(fp8, tmp_path):
    """A merge creates expert weights: they are written in block FP8 too (not bf16), close to the merge."""
    from moepress.io import save_compressed
    from moepress.plan import Prune

    model = AutoModelForCausalLM.from_pretrained(fp8, dtype=torch.float32, **load_kwargs(fp8)).eval()
    plan = CompressionPlan(method="test-merge")
    plan.layers = {1: Prune(keep_experts=[0, 1, 2, 3, 4, 5])}
    compressed = apply_plan(model, plan)
    with torch.no_grad():  # a weight no source expert has: the mean of two
        experts = compressed.model.layers[1].mlp.experts
        experts.gate_up_proj[0] = (experts.gate_up_proj[0] + experts.gate_up_proj[1]) / 2
    out = save_compressed(compressed, plan, tmp_path / "out", source=fp8)
    written = stored_tensors(out)
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    assert written[name].dtype == torch.float8_e4m3fn
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in manifest["quantization"]["quantized"]
    assert "model.layers.1.mlp.experts.0.down_proj.weight" not in manifest["quantization"]["quantized"]
    value = BlockFP8(json.loads((out / "config.json").read_text())["quantization_config"]).dequantize(
        name, written, torch.float32)
    want = compressed.model.layers[1].mlp.experts.gate_up_proj[0, :16]
    assert torch.allclose(value, want, atol=0.07 * want.abs().max().item())


def test_quantised_input_errors_are_one_line(fp8, text, tmp_path):
    with pytest.raises(MoepressError, match="not one moepress reads"):
        scheme_for({"quantization_config": {"quant_method": "bitsandbytes"}})
    scheme = folder_scheme(fp8)
    stored = stored_tensors(fp8)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    with pytest.raises(MoepressError, match="has no .*weight_scale_inv"):
        scheme.dequantize(name, {name: stored[name]}, torch.float32)
    with pytest.raises(MoepressError, match="check weight_block_size"):
        scheme.dequantize(name, {name: stored[name], name + "_scale_inv": torch.ones(3, 3)}, torch.float32)
    # through the CLI: an unknown scheme in config.json stops before any weight loads, in one line
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in fp8.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "hqq"}
    (bad / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["compress", str(bad), "--method", "frequency", "--ratio", "0.25", "--data",
                                 str(text), "-n", "8", "--seq-len", "64", "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, MoepressError)  # `moepress` prints it as one line, exit code 2
    assert "not one moepress reads" in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "out").exists()
