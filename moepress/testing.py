"""Tiny random-initialised models of every supported family, built from real `transformers` config
classes: the fixtures for mechanics tests and the `demo-model` command. Not for quality numbers.

The tiny models themselves live in `moepress.models.tiny` (the families table reads them too); this
module re-exports them and adds a remote-code checkpoint writer."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from moepress.models.tiny import (
    TINY_FAMILIES,
    declared_families,
    declared_tiny_config,
    randomize_routers,
    tiny_config,
    tiny_model,
)

__all__ = [
    "TINY_FAMILIES", "declared_families", "declared_tiny_config", "randomize_routers", "tiny_config", "tiny_model",
    "write_remote_code_model",
]


def write_remote_code_model(out_dir, modeling_dir, seed: int = 0) -> None:
    """Write a tiny DeepSeekMoE-16B style remote-code checkpoint (ModuleList experts) to `out_dir`.

    `modeling_dir` holds `configuration_deepseek.py` and `modeling_deepseek.py` (the tests ship them).
    """
    import shutil
    from pathlib import Path

    out_dir, modeling_dir = Path(out_dir), Path(modeling_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        shutil.copy(modeling_dir / name, out_dir / name)
    cfg = tiny_config("deepseek_v2")
    cfg.auto_map = {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    }
    d = cfg.to_dict()
    d["model_type"] = "deepseek"
    d["architectures"] = ["DeepseekForCausalLM"]
    import json

    (out_dir / "config.json").write_text(json.dumps(d, indent=2))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True) if (
        out_dir / "model.safetensors"
    ).exists() else AutoModelForCausalLM.from_config(
        __import__("transformers").AutoConfig.from_pretrained(out_dir, trust_remote_code=True),
        trust_remote_code=True,
    )
    randomize_routers(model, seed)
    model.save_pretrained(out_dir)


def write_tiny_fp8_model(out_dir, family: str = "deepseek_v3", block: tuple[int, int] = (16, 16), seed: int = 0,
                         **overrides):
    """Write a tiny random `family` checkpoint in block-scaled FP8 (DeepSeek-V3's published layout:
    every linear weight but the router, embeddings and lm_head as float8_e4m3fn + `weight_scale_inv`),
    with the demo grammar's word tokenizer (the vocabulary sized to it). Returns the float model whose
    weights were quantised. `overrides` go to the tiny config (vLLM's CPU FP8 kernels need 128-multiples)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from moepress.demo.grammar import word_tokenizer
    from moepress.quant.block_fp8 import BlockFP8

    out_dir = Path(out_dir)
    tokenizer = word_tokenizer()
    model = tiny_model(family, seed=seed, vocab_size=len(tokenizer), **overrides).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    scheme = BlockFP8(qc)
    state = load_file(out_dir / "model.safetensors")
    stored = {}
    for name, tensor in state.items():
        if tensor.dim() == 2 and name.endswith("proj.weight") and "embed" not in name:
            stored.update(scheme.quantize(name, tensor))
        elif name.endswith("e_score_correction_bias"):  # float32 in DeepSeek-V3's published shards
            stored[name] = model.get_parameter(name).float() if name in dict(model.named_parameters()) \
                else model.get_buffer(name).float()
        else:
            stored[name] = tensor
    save_file(stored, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = qc
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model
