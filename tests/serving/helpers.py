"""Checkpoints for the serving tests, and greedy decoding in vLLM and in transformers."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NEW_TOKENS = 16
PROMPTS = (
    "The history of the city begins",
    "In mathematics, a group is",
    "She opened the door and",
)
# small calibration: these tests check serving, not compression quality
CALIB = dict(n=8, seq_len=64, overwrite=True)


def prompt_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(p).input_ids for p in PROMPTS]


def vllm_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """vLLM's greedy continuation of each prompt, float32 on CPU (the engine is freed before returning)."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(folder),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        disable_log_stats=True,
        seed=0,
    )
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()


def transformers_greedy(folder: Path, prompts: list[list[int]]) -> list[list[int]]:
    """`moepress.load`'s greedy continuation of each prompt, float32."""
    import moepress

    model = moepress.load(folder, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
            out.append(ids[0, len(p) :].tolist())
    return out


def write_native(source: Path, out: Path, layers: tuple[int, ...] = (0, 1, 3), drop_value: bool = False) -> Path:
    """vLLM's native MoNE format written by hand from a plain checkpoint: a quarter of the experts of `layers`
    become novices (`approximate_experts`, `<experts>.<id>.approx_value`), the rest keep their ids.
    `drop_value`: leave one approx_value out (a broken checkpoint)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = json.loads((source / "config.json").read_text())
    n = config["num_experts"]
    g = torch.Generator().manual_seed(0)
    novices = {str(i): sorted(torch.randperm(n, generator=g)[: n // 4].tolist()) for i in layers}
    config["approximate_experts"] = novices
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tensors = load_file(source / "model.safetensors")
    dtype = tensors["model.embed_tokens.weight"].dtype
    kept = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if ".mlp.experts." in name and parts[2] in novices and int(parts[5]) in novices[parts[2]]:
            continue
        kept[name] = t
    for layer, ids in novices.items():
        for e in ids:
            vector = 0.05 * torch.randn(config["hidden_size"], generator=g)
            kept[f"model.layers.{layer}.mlp.experts.{e}.approx_value"] = vector.to(dtype)
    if drop_value:
        kept.pop(next(k for k in kept if k.endswith("approx_value")))
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_layer_counts(source: Path, out: Path) -> Path:
    """A per-layer expert count: layer 1 keeps three quarters of its experts, layer 3 half, the rest all."""
    from moepress.compression import apply
    from moepress.plan import CompressionPlan, Prune

    n = json.loads((source / "config.json").read_text())["num_experts"]
    plan = CompressionPlan(
        method="manual",
        layers={
            1: Prune(keep_experts=[e for e in range(n) if e % 4 != 3]),
            3: Prune(keep_experts=list(range(1, n, 2))),
        },
    )
    plan_file = out.with_suffix(".plan.json")
    plan.save(plan_file)
    return Path(apply(source, plan_file, out, overwrite=True))
