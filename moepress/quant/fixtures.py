"""Tiny quantised checkpoints for tests: the published on-disk layouts, written from tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: gpt-oss-20b/120b's own `quantization_config`: only the routed experts are MXFP4
GPT_OSS_MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
    ],
}


def write_tiny_gpt_oss_mxfp4(out_dir, seed: int = 0, tokenizer: bool = True, **overrides):
    """Write a tiny random gpt-oss checkpoint in gpt-oss's MXFP4 layout to `out_dir`: every layer's
    `mlp.experts.{gate_up,down}_proj` as `_blocks`/`_scales` (moepress's MXFP4 quantisation), every other
    tensor bf16, `quantization_config` as gpt-oss publishes it. `tokenizer`: with the demo grammar's word
    tokenizer (the vocabulary sized to it), which compressing needs. `overrides` go to the tiny config
    (hidden and intermediate sizes must stay multiples of 32). Returns the bf16 model the checkpoint
    encodes (experts dequantised)."""
    from safetensors.torch import load_file, save_file

    from moepress.models.tiny import tiny_model
    from moepress.quant.mxfp4 import MXFP4

    out_dir = Path(out_dir)
    words = None
    if tokenizer:
        from moepress.demo.grammar import word_tokenizer

        words = word_tokenizer()
        overrides.setdefault("vocab_size", len(words))
    model = tiny_model("gpt_oss", seed=seed, **overrides).to(torch.bfloat16)
    scheme = MXFP4(GPT_OSS_MXFP4_CONFIG)
    stored: dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                quantised = scheme.quantize(name, param)
                stored.update(quantised)
                param.copy_(scheme.dequantize(name, quantised, param.dtype))
    model.save_pretrained(out_dir)
    state = load_file(out_dir / "model.safetensors")
    for name in list(state):
        if name + "_blocks" in stored:
            del state[name]
    state.update(stored)
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = dict(GPT_OSS_MXFP4_CONFIG)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if words is not None:
        words.save_pretrained(out_dir)
    return model
