"""`--quantize gptq-w4a16`: GPTQ through llm-compressor's `oneshot` on the run's calibration tokens.

llm-compressor pins its own transformers and compressed-tensors, so it lives in an environment of its own
(`pip install llmcompressor -e .[dev]`: CI's third stage); without it these tests skip. What they pin: the
calibrated output takes the data-free path's choices (routed experts whose input features are not a
multiple of 128 in the group that divides them, routers kept float), loads with plain transformers, and
GPTQ's calibration is real: its logits on held-out text are closer to the float model's than
round-to-nearest's (`--quantize w4a16`) at the same scheme."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moepress.data.text import load_tokens
from moepress.evaluate.perplexity import load_eval_ids
from moepress.quant.export import quantize_folder
from tests.conftest import DATA, mini_model_path

pytest.importorskip("llmcompressor", reason="llm-compressor is installed in CI's third stage only")


def _logits(folder, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def test_gptq_output_is_calibrated_and_loads_plain(tmp_path):
    import moepress

    source = mini_model_path("olmoe-mini")
    float_out = moepress.compress(source, "frequency", tmp_path / "float", data=DATA / "calib.txt", ratio=0.25,
                                  n=8, seq_len=64)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(float_out)
    calibration = load_tokens(tokenizer, DATA / "calib.txt", n=32, seq_len=128).input_ids
    outs = {}
    for scheme in ("gptq-w4a16", "w4a16"):
        outs[scheme] = shutil.copytree(float_out, tmp_path / scheme)
        report = quantize_folder(outs[scheme], scheme, calibration=calibration if scheme.startswith("gptq") else None)
        assert report["quantized"], scheme
    config = json.loads((outs["gptq-w4a16"] / "config.json").read_text())["quantization_config"]
    groups = {g["targets"][0]: g["weights"]["group_size"] for g in config["config_groups"].values()}
    assert groups == {"Linear": 128, r"re:.*\.experts\.\d+\..*": 64}  # olmoe-mini's experts: 64 input features
    assert any(name.endswith("mlp.gate") for name in config["ignore"])
    before, after = stored = (_stored(float_out), _stored(outs["gptq-w4a16"]))
    assert after < 0.45 * before, stored

    dev = load_eval_ids(tokenizer, DATA / "dev.txt", max_tokens=4 * 256).view(4, 256)
    want = _logits(float_out, dev)
    error = {s: ((_logits(o, dev) - want).norm() / want.norm()).item() for s, o in outs.items()}
    assert error["gptq-w4a16"] < error["w4a16"], error


def _stored(folder) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_gptq_through_compress_records_it(tmp_path):
    """Through `moepress compress` on another family (DeepSeek-V2: MLA attention, shared experts, whose
    fused experts llm-compressor linearises after loading)."""
    import moepress

    out = moepress.compress(mini_model_path("dsv2-mini"), "frequency", tmp_path / "out", data=DATA / "calib.txt",
                            ratio=0.5, n=8, seq_len=64, quantize="gptq-w4a16")
    manifest = json.loads((out / "moepress_manifest.json").read_text())
    assert manifest["quantization"]["quantize"] == "gptq-w4a16"
    assert manifest["stored_bytes_after"] < 0.5 * manifest["stored_bytes_before"]  # embeddings, lm_head stay bf16
    assert "gptq-w4a16" in (out / "README.md").read_text()
