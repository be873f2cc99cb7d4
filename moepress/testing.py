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
