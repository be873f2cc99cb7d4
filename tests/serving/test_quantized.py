"""A pruned checkpoint quantised on the way out (`--quantize w4a16`, compressed-tensors) served by vLLM's CPU
build: the same greedy tokens as `moepress.load` (bf16: the CPU build's int4 kernel takes no float32), up to a
step where transformers' two best candidates tie to bf16 rounding (there vLLM's int4 GEMM and transformers'
dequantised bf16 one may pick either)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.serving.helpers import NEW_TOKENS, prompt_ids

MODELS = Path(__file__).resolve().parents[2].parent / "shared" / "models"
DATA = MODELS.parent / "data" / "calib.txt"


@pytest.mark.parametrize("method", ["frequency", "mone"])
def test_w4a16_output_served_by_vllm_cpu(tmp_path, method):
    """`frequency`: a plain checkpoint, stock vLLM; `mone`: the native novice format, which vLLM 0.32 serves
    through moepress's plugin."""
    import moepress

    source = MODELS / "olmoe-mini"
    if not (source / "config.json").is_file():
        pytest.skip(f"{source} not present")
    out = moepress.compress(source, method, tmp_path / "out", data=DATA, ratio=0.25, n=8, seq_len=64,
                            quantize="w4a16")
    assert_served_like_moepress(Path(out))


def test_gptq_output_served_by_vllm_cpu():
    """A GPTQ output (`--quantize gptq-w4a16`) written in llm-compressor's environment, which cannot hold vLLM
    (their compressed-tensors pins differ): CI's third stage writes it and names it in MOEPRESS_GPTQ_OUTPUT,
    then runs this test in the vLLM stage's environment."""
    out = os.environ.get("MOEPRESS_GPTQ_OUTPUT")
    if not out:
        pytest.skip("MOEPRESS_GPTQ_OUTPUT names no GPTQ output (CI's third stage writes one)")
    assert json.loads((Path(out) / "moepress_manifest.json").read_text())["quantization"]["quantize"] == "gptq-w4a16"
    assert_served_like_moepress(Path(out))  # checks the pack-quantized format too


def assert_served_like_moepress(out: Path) -> None:
    """vLLM's greedy tokens (bf16) equal `moepress.load`'s up to a bf16 tie."""
    import moepress

    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    prompts = prompt_ids(out)
    model = moepress.load(out, dtype=torch.bfloat16)
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False)[0, len(p):].tolist() for p in prompts]
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out), dtype="bfloat16", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)
    finally:
        del llm
    got = [list(o.outputs[0].token_ids) for o in outs]
    for prompt, g, w in zip(prompts, got, want, strict=True):
        if g == w:
            continue
        i = next(j for j, (a, b) in enumerate(zip(g, w, strict=True)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + w[:i]])).logits[0, -1].float()
        gap = (logits[w[i]] - logits[g[i]]).abs().item()
        assert gap <= 2e-2 * logits.abs().max().item(), f"vLLM {g} != transformers {w} (step {i}, gap {gap:.3g})"
